"""Stage 6: PPO, the controller. Ray actors play the RLHF roles (actors/): vLLM rollout engines, the
frozen SFT reference, the reward model, and a group of DeepSpeed ZeRO-2 learners (policy + critic).

    python jobs/ppo.py [preset=tiny] [ppo.steps=20] [ppo.reward=model|length:16|contains:医生]
        [ppo.advantage=gae|grpo|rloo] [ppo.kl_controller=fixed|adaptive] [key=value ...]
    ray job submit --working-dir . -- python jobs/ppo.py run_root=$PWD/runs data.root=/abs/corpora

One step: prompts (Ray Data) -> the rollout engines generate n responses per prompt -> in parallel,
reference log-probs, rewards, and the policy's own log-probs and values -> token-level rewards (the
score on the last token minus beta * KL per token) -> advantages (GAE, whitened; or GRPO / RLOO) ->
PPO-clip and clipped value losses over several epochs of minibatches on the learners -> the merged
policy weights pushed into the rollout engines (through the object store, or an NCCL broadcast between
GPUs: ppo.weight_sync) -> metrics.

Needs runs/<preset>/sft/final (the policy and reference) and, for ppo.reward=model, rm/final (the
reward, and the critic's starting point). A rerun resumes from the last checkpoint in ppo/checkpoints; so does
the running job when a role dies (up to ppo.max_failures times; rollout engines restart on their own).
Output: ppo/final (merged HF policy) and ppo/adapter (LoRA), history.jsonl, tensorboard, summary.json/md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from actors.learner import LearnerGroup
from actors.placement import role_actors
from actors.reference import ReferenceActor
from actors.reward import RewardActor, parse_reward
from actors.rollout import RolloutActor, StaleWeights
from clinicalgpt import rl
from clinicalgpt.config import Config, load_config
from clinicalgpt.experience import build_batch, split_batch
from clinicalgpt.runtime import init_ray
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids

KEEP_CHECKPOINTS = 2
# Exported to Prometheus as ray_clinicalgpt_ppo_<name> (monitoring/grafana-dashboard.json plots them).
METRICS = ("reward", "kl", "eval_reward", "samples_per_s", "generate_s", "score_s", "train_s", "sync_s", "step_s",
           "step")


class TokenizePrompts:
    """Ray Data callable: records -> the chat up to (without) the reference reply, rendered with the
    generation prompt and tokenized. Over-long prompts keep their length so the driver can count them."""

    def __init__(self, tokenizer_path: str, chat_template: str):
        self.tok = load_tokenizer(tokenizer_path, chat_template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [prompt_ids(self.tok, chat[:-1] if chat[-1]["role"] == "assistant" else chat)
               for chat in batch.column("messages").to_pylist()]
        return pa.table({"id": batch.column("id"), "prompt_ids": pa.array(ids, pa.list_(pa.int64()))})


def prompt_dataset(cfg: Config, split: str) -> ray.data.Dataset:
    from clinicalgpt.corpus import read_records
    ds = read_records(cfg, [split], list(cfg.ppo.prompt_tasks)).map_batches(
        TokenizePrompts, fn_constructor_kwargs={"tokenizer_path": cfg.model_path, "chat_template": cfg.model.chat_template},
        batch_format="pyarrow", batch_size=256, concurrency=1, num_cpus=0.5)
    ds.context.execution_options.preserve_order = True  # the same order every run: resumable, comparable
    return ds


class PromptStream:
    """Training prompts from Ray Data, epoch after epoch (shuffled per epoch with a seeded buffer);
    `consumed` is the data position a checkpoint records, so a resumed run skips what it has seen."""

    def __init__(self, cfg: Config, consumed: int = 0):
        self.ds, self.max_len, self.seed = prompt_dataset(cfg, "rl"), cfg.ppo.max_prompt_len, cfg.ppo.seed
        self.consumed, self.skipped_long = consumed, 0
        self._rows = self._forever(consumed)

    def _forever(self, skip: int):
        epoch = 0
        while True:
            batches = iter(self.ds.iter_batches(batch_size=256, batch_format="numpy", local_shuffle_buffer_size=2048,
                                                local_shuffle_seed=self.seed + epoch))
            try:
                for batch in batches:
                    for ids in batch["prompt_ids"]:
                        if skip > 0:
                            skip -= 1
                            continue
                        yield ids
            finally:  # on close(): stop Ray Data's executor, whose thread would otherwise outlive ray.shutdown()
                batches.close()
            epoch += 1

    def take(self, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            ids = next(self._rows)
            self.consumed += 1
            if len(ids) > self.max_len:
                self.skipped_long += 1
                continue
            out.append(ids.tolist())
        return out

    def close(self) -> None:
        self._rows.close()


@dataclass
class Roles:
    rollout: list
    reference: list
    reward: list
    learners: LearnerGroup
    groups: list
    pad_id: int
    weight_sync: str  # object_store | nccl
    weights: object = None  # the policy weights pushed last (an ObjectRef), for engines that restart
    weights_version: int = 0

    def shutdown(self) -> None:
        for engine in self.rollout:
            try:
                ray.get(engine.shutdown.remote())
            except ray.exceptions.RayActorError:  # already gone
                pass
        for actor in self.rollout + self.reference + self.reward + self.learners.ranks:
            ray.kill(actor)
        for group in self.groups:
            ray.util.remove_placement_group(group)


def weight_sync_mode(cfg: Config) -> str:
    """ppo.weight_sync resolved: nccl needs whole GPUs for the rollout and learner roles."""
    pc = cfg.ppo
    whole_gpus = pc.rollout.gpus >= 1 and pc.learner.gpus >= 1
    if pc.weight_sync == "auto":
        return "nccl" if whole_gpus else "object_store"
    if pc.weight_sync not in ("object_store", "nccl"):
        raise SystemExit(f"ppo.weight_sync={pc.weight_sync!r}: one of auto, object_store, nccl")
    if pc.weight_sync == "nccl" and not whole_gpus:
        raise SystemExit(f"ppo.weight_sync=nccl needs whole GPUs for the rollout and learner roles (ppo.rollout.gpus="
                         f"{pc.rollout.gpus:g}, ppo.learner.gpus={pc.learner.gpus:g}): NCCL cannot join two processes "
                         "on one GPU; colocated roles and CPUs use ppo.weight_sync=object_store")
    return pc.weight_sync


def start_roles(cfg: Config, policy: str, reward_model: str, critic: str | None) -> Roles:
    pc = cfg.ppo
    max_len = pc.max_prompt_len + pc.max_new_tokens
    sync = weight_sync_mode(cfg)
    rollout, g1 = role_actors(RolloutActor, pc.rollout, "rollout", lambda i: (
        policy, max_len, pc.seed + i, pc.rollout_memory_fraction, cfg.model.dtype, "nccl" if sync == "nccl" else ""),
        max_restarts=pc.rollout_restarts)
    reference, g2 = role_actors(ReferenceActor, pc.reference, "reference", lambda i: (
        policy, cfg.model.dtype, pc.forward_rows))
    reward, g3 = role_actors(RewardActor, pc.reward_model, "reward", lambda i: (
        pc.reward, reward_model, cfg.model.dtype, pc.forward_rows))
    learners = LearnerGroup(cfg, policy, critic)  # the other roles start meanwhile
    ray.get([a.__ray_ready__.remote() for a in rollout + reference + reward])  # a role that fails to start fails here
    if sync == "nccl":
        ray.get([learners.ranks[0].open_weight_transfer.remote(i, engine) for i, engine in enumerate(rollout)])
    return Roles(rollout, reference, reward, learners, [g1, g2, g3, learners.group],
                 load_tokenizer(policy).pad_token_id, sync)


def sharded(actors: list, method: str, batch: dict) -> list:
    """Call `method` on each actor with its row shard of the batch (ObjectRefs, in row order)."""
    return [getattr(a, method).remote(s) for a, s in zip(actors, split_batch(batch, len(actors)))]


def generate(roles: Roles, prompts: list[list[int]], n: int, cfg: Config, seed: int, greedy: bool = False):
    """Responses from the rollout engines (prompts split between them): the batch and the engines' log-probs."""
    pc = cfg.ppo
    chunks = np.array_split(np.arange(len(prompts)), len(roles.rollout))
    calls = [(a, [prompts[i] for i in c], seed + int(c[0])) for a, c in zip(roles.rollout, chunks) if len(c)]

    def call(engine, part: list, part_seed: int):
        return engine.generate.remote(part, n, pc.max_new_tokens, 0.0 if greedy else pc.temperature, pc.top_p,
                                      part_seed, roles.weights_version)

    refs, parts = [call(*c) for c in calls], []
    for c, ref in zip(calls, refs):
        try:
            parts.append(ray.get(ref))
        except (ray.exceptions.RayActorError, StaleWeights):  # the engine died, or came back with old weights
            restore_engine(roles, c[0])
            parts.append(ray.get(call(*c)))
    samples = [s for part in parts for s in part]
    batch = build_batch([p for p in prompts for _ in range(n)], [s["ids"] for s in samples], roles.pad_id)
    engine_logprobs = np.zeros_like(batch["response_mask"])
    for i, s in enumerate(samples):
        engine_logprobs[i, :len(s["logprobs"])] = s["logprobs"]
    return batch, engine_logprobs


def score(roles: Roles, batch: dict) -> dict[str, np.ndarray]:
    """Reference log-probs, rewards, and the policy's log-probs and values, computed in parallel."""
    ref = sharded(roles.reference, "logprobs", batch)
    rew = sharded(roles.reward, "score", batch)
    own = sharded(roles.learners.ranks, "evaluate", batch)
    own = ray.get(own)
    out = {"ref_logprobs": np.concatenate(ray.get(ref)), "scores": np.concatenate(ray.get(rew)),
           "old_logprobs": np.concatenate([o["logprobs"] for o in own])}
    if "values" in own[0]:
        out["old_values"] = np.concatenate([o["values"] for o in own])
    return out


def advantages(cfg: Config, scored: dict, mask: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    pc = cfg.ppo
    t = {k: torch.as_tensor(v) for k, v in scored.items()}
    kl = rl.kl_per_token(t["old_logprobs"], t["ref_logprobs"], pc.kl_estimator) * mask
    rewards = rl.token_rewards(t["scores"], kl, mask, beta)
    if pc.advantage == "gae":
        adv, returns = rl.gae(rewards, t["old_values"], mask, pc.gamma, pc.lam)
    else:
        adv = rl.group_advantages(rewards.sum(1), pc.samples_per_prompt, pc.advantage)[:, None] * mask
        returns = None
    if pc.whiten_advantages:
        adv = rl.whiten(adv, mask)
    return {"kl": kl, "advantages": adv, "returns": returns}


def ppo_step(cfg: Config, roles: Roles, prompts: list[list[int]], beta: float, step: int) -> dict:
    """One iteration: generate, score, advantages, PPO epochs on the learners, weight push. Its metrics."""
    pc = cfg.ppo
    t0 = time.time()
    batch, engine_logprobs = generate(roles, prompts, pc.samples_per_prompt, cfg, seed=(pc.seed * 100003 + step) * 10007)
    t1 = time.time()
    scored = score(roles, batch)
    mask = torch.as_tensor(batch["response_mask"])
    adv = advantages(cfg, scored, mask, beta)
    t2 = time.time()
    experience = {**batch, "old_logprobs": scored["old_logprobs"], "advantages": adv["advantages"].numpy()}
    if adv["returns"] is not None:
        experience.update(old_values=scored["old_values"], returns=adv["returns"].numpy())
    stats = ray.get([r.train.remote(s, step) for r, s in zip(roles.learners.ranks, split_batch(experience, pc.learner.num))])
    t3 = time.time()
    push_weights(roles)
    t4 = time.time()
    row = {"step": step + 1, "reward": float(scored["scores"].mean()), "reward_std": float(scored["scores"].std()),
           "kl": float(adv["kl"].sum(1).mean()), "beta": beta, "response_length": float(mask.sum(1).mean()),
           **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]},
           # The engine's log-probs against the learner's for the same tokens: near 0 unless the weights diverged.
           "engine_logprob_gap": float(rl.masked_mean((torch.as_tensor(engine_logprobs)
                                                       - torch.as_tensor(scored["old_logprobs"])).abs(), mask)),
           "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2, "sync_s": t4 - t3, "step_s": t4 - t0,
           "samples_per_s": len(mask) / (t4 - t0)}
    if adv["returns"] is not None:
        row["explained_variance"] = rl.explained_variance(torch.as_tensor(scored["old_values"]), adv["returns"], mask)
    return row


def evaluate_held_out(roles: Roles, cfg: Config, prompts: list[list[int]]) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean reward and KL to the reference (summed per response)."""
    batch, _ = generate(roles, prompts, 1, cfg, cfg.ppo.seed, greedy=True)
    scored = score(roles, batch)
    mask = torch.as_tensor(batch["response_mask"])
    # k3, not k1: greedy answers are not samples of the policy, and k1's sum over them can go negative.
    kl = rl.kl_per_token(torch.as_tensor(scored["old_logprobs"]), torch.as_tensor(scored["ref_logprobs"]), "k3")
    return {"eval_reward": float(scored["scores"].mean()), "eval_kl": float((kl * mask).sum(1).mean()),
            "eval_response_length": float(mask.sum(1).mean())}


def push_weights(roles: Roles) -> None:
    roles.weights_version += 1
    if roles.weight_sync == "nccl":
        ray.get(roles.learners.ranks[0].send_weights.remote())
        ray.get([a.set_weights_version.remote(roles.weights_version) for a in roles.rollout])
        return
    roles.weights = roles.learners.ranks[0].policy_weights.remote()  # kept in the object store for restarts
    ray.get([a.load_weights.remote(roles.weights, roles.weights_version) for a in roles.rollout])


def restore_engine(roles: Roles, engine) -> None:
    """A rollout engine that died is rebuilt by Ray with its starting weights: wait for it, push the current."""
    started = time.time()
    while True:
        try:
            ray.get(engine.__ray_ready__.remote())
            break
        except ray.exceptions.ActorUnavailableError:  # still being rebuilt (a dead one for good raises ActorDiedError)
            if time.time() - started > 600:
                raise
            time.sleep(1)
    if roles.weight_sync == "nccl":  # the rebuilt engine joins a new group with learner rank 0
        learner, index = roles.learners.ranks[0], roles.rollout.index(engine)
        ray.get(learner.open_weight_transfer.remote(index, engine))
        if roles.weights_version:
            ray.get(learner.send_weights.remote(index))
            ray.get(engine.set_weights_version.remote(roles.weights_version))
    elif roles.weights is not None:
        ray.get(engine.load_weights.remote(roles.weights, roles.weights_version))
    print(f"[ppo] a rollout engine was restarted; weights version {roles.weights_version} pushed to it "
          f"({time.time() - started:.1f}s)", flush=True)


def save_checkpoint(folder: Path, roles: Roles, state: dict) -> None:
    """Written beside the last good checkpoint, then renamed into place: a crash mid-write leaves a
    .tmp folder that resume ignores."""
    tmp = folder / f"step_{state['step']:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    roles.learners.call("save", str(tmp))
    (tmp / "controller.json").write_text(json.dumps(state))
    os.replace(tmp, folder / f"step_{state['step']:06d}")
    for old in sorted(folder.glob("step_??????"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step_??????") if (p / "controller.json").exists())
    return done[-1] if done else None


def resume(cfg: Config, roles: Roles, ckpt_dir: Path) -> tuple[int, int, rl.FixedKL]:
    """Load the last checkpoint into fresh roles: (step, prompts consumed, KL controller); a fresh start
    without one."""
    pc = cfg.ppo
    kl_ctl = rl.kl_controller(pc.kl_controller, pc.kl_coef, pc.kl_target, pc.kl_horizon)
    last = latest_checkpoint(ckpt_dir)
    if last is None:
        return 0, 0, kl_ctl
    state = json.loads((last / "controller.json").read_text())
    roles.learners.call("load", str(last))
    push_weights(roles)
    kl_ctl.beta = state["beta"]
    print(f"[ppo] resumed from {last.name}: step {state['step']}, {state['consumed']} prompts consumed", flush=True)
    return state["step"], state["consumed"], kl_ctl


def dead_actors(roles: Roles) -> list:
    """The role actors that are gone (a dead learner rank takes its peers' collectives down with it)."""
    actors = roles.rollout + roles.reference + roles.reward + roles.learners.ranks
    pings = [a.__ray_ready__.remote() for a in actors]
    answered, _ = ray.wait(pings, num_returns=len(pings), timeout=60)  # the silent ones are busy or hung, but there
    dead = []
    for actor, ping in zip(actors, pings):
        if ping in answered:
            try:
                ray.get(ping)
            except ray.exceptions.RayActorError:
                dead.append(actor)
    return dead


def check_inputs(cfg: Config) -> tuple[str, str, str | None]:
    """(policy, reward model, critic) paths, or a message saying what to run first."""
    pc = cfg.ppo
    try:
        kind, _ = parse_reward(pc.reward)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if pc.kl_controller not in rl.KL_CONTROLLERS:
        raise SystemExit(f"ppo.kl_controller={pc.kl_controller!r}: one of {', '.join(rl.KL_CONTROLLERS)}")
    if pc.kl_estimator not in rl.KL_ESTIMATORS:
        raise SystemExit(f"ppo.kl_estimator={pc.kl_estimator!r}: one of {', '.join(rl.KL_ESTIMATORS)}")
    policy, rm = cfg.stage_dir("sft") / "final", cfg.stage_dir("rm") / "final"
    if not (policy / "config.json").exists():
        raise SystemExit(f"no SFT model at {policy}: run the earlier stages first "
                         f"(python jobs/recipe.py preset={cfg.preset}, or jobs/sft.py after data, bootstrap, pretrain)")
    if kind == "model" and not (rm / "config.json").exists():
        raise SystemExit(f"no reward model at {rm}: run python jobs/rm.py preset={cfg.preset} first "
                         "(or use a rule reward, e.g. ppo.reward=length:16)")
    if pc.advantage not in rl.ADVANTAGE_ESTIMATORS:
        raise SystemExit(f"ppo.advantage={pc.advantage!r}: one of {', '.join(rl.ADVANTAGE_ESTIMATORS)}")
    weight_sync_mode(cfg)
    if pc.length_group < 1 or pc.forward_rows < 1:
        raise SystemExit(f"ppo.length_group ({pc.length_group}) and ppo.forward_rows ({pc.forward_rows}) must be >= 1")
    rows, ranks = pc.prompts_per_step * pc.samples_per_prompt, pc.learner.num
    if pc.minibatch % ranks or rows % ranks or rows // ranks < pc.minibatch // ranks:
        raise SystemExit(f"ppo: {rows} responses per step and minibatch {pc.minibatch} must both divide "
                         f"among {ranks} learner ranks, with at least one minibatch per rank")
    # The prompt stream's read tasks (1 CPU) and tokenizer actor (0.5) run beside the roles.
    need = sum(r.num * r.cpus for r in (pc.rollout, pc.reference, pc.reward_model, pc.learner)) + 1.5
    if ray.cluster_resources().get("CPU", 0) < need:
        raise SystemExit(f"the Ray cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs; PPO needs {need:g} "
                         "(its roles plus 1.5 for the prompt stream): start it with more, e.g. "
                         "`ray start --head --num-cpus=4` (logical CPUs may exceed the cores), or give roles fewer")
    # The critic starts from the reward model it learns to predict; under a rule reward the RM's scores mean
    # nothing, so from the SFT model with a new, zeroed head (advantages start as the whitened returns).
    critic = None if pc.advantage != "gae" else str(rm if kind == "model" else policy)
    return str(policy), str(rm if kind == "model" else policy), critic


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    init_ray(cfg)
    policy, reward_model, critic = check_inputs(cfg)
    pc, out = cfg.ppo, cfg.stage_dir("ppo")
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    roles = start_roles(cfg, policy, reward_model, critic)
    step, consumed, kl_ctl = resume(cfg, roles, ckpt_dir)
    print(f"[ppo] roles up in {time.time() - started:.1f}s: {pc.rollout.num} rollout, {pc.reference.num} reference, "
          f"{pc.reward_model.num} reward, {pc.learner.num} learner rank(s); reward {pc.reward}, "
          f"advantage {pc.advantage}, weights by {roles.weight_sync}", flush=True)

    stream = PromptStream(cfg, consumed)
    eval_prompts = [list(r["prompt_ids"]) for r in prompt_dataset(cfg, "valid").take(pc.eval_prompts * 4)
                    if len(r["prompt_ids"]) <= pc.max_prompt_len][:pc.eval_prompts]
    log = Log(cfg, out)
    if step == 0:
        log.write({"step": 0, **evaluate_held_out(roles, cfg, eval_prompts)})
    failures = 0
    while step < pc.steps:
        try:
            row = ppo_step(cfg, roles, stream.take(pc.prompts_per_step), kl_ctl.beta, step)
            kl_ctl.update(row["kl"], pc.prompts_per_step * pc.samples_per_prompt)
            row["skipped_long_prompts"] = stream.skipped_long
            if row["step"] % pc.eval_every == 0 or row["step"] == pc.steps:
                row.update(evaluate_held_out(roles, cfg, eval_prompts))
            log.write(row)
            step = row["step"]
            if step % pc.checkpoint_every == 0 or step == pc.steps:
                save_checkpoint(ckpt_dir, roles, {"step": step, "consumed": stream.consumed, "beta": kl_ctl.beta})
        except ray.exceptions.RayError:
            failed = time.time()
            if failures == pc.max_failures or not dead_actors(roles):
                raise
            failures += 1
            print(f"[ppo] a role died during step {step + 1} (failure {failures} of {pc.max_failures} allowed): "
                  "restarting the roles from the last checkpoint", flush=True)
            roles.shutdown()
            stream.close()
            roles = start_roles(cfg, policy, reward_model, critic)
            step, consumed, kl_ctl = resume(cfg, roles, ckpt_dir)
            stream = PromptStream(cfg, consumed)
            print(f"[ppo] recovered in {time.time() - failed:.1f}s: training goes on from step {step + 1}", flush=True)

    stream.close()
    roles.learners.call("export", str(out / "final"))
    roles.shutdown()
    summary = log.summary(str(out / "final"))
    print(f"[ppo] done: reward {summary['first_reward']:.3f} -> {summary['last_reward']:.3f}, held-out reward "
          f"{summary['first_eval_reward']:.3f} -> {summary['last_eval_reward']:.3f} (KL {summary['last_eval_kl']:.3f}); "
          f"policy -> {summary['model']}", flush=True)
    return summary


class Log:
    """Per-step metrics to the console, history.jsonl, TensorBoard and Ray metrics (Prometheus)."""

    def __init__(self, cfg: Config, out: Path):
        from ray.util.metrics import Gauge
        from torch.utils.tensorboard import SummaryWriter
        self.cfg, self.out, self.started = cfg, out, time.time()
        self.history = (out / "history.jsonl").open("a", buffering=1)
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        self.gauges = {k: Gauge(f"clinicalgpt_ppo_{k}", description=f"PPO {k}") for k in METRICS}
        self.first_step = None

    def write(self, row: dict) -> None:
        step = row["step"]
        self.history.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                self.tensorboard.add_scalar(f"ppo/{k}", v, step)
            if k in self.gauges:
                self.gauges[k].set(v)
        pc = self.cfg.ppo
        if "reward" not in row:
            print(f"[ppo] before training: held-out reward {row['eval_reward']:.3f}, "
                  f"response length {row['eval_response_length']:.1f}", flush=True)
            return
        self.first_step = self.first_step or step
        if step % pc.log_every == 0 or "eval_reward" in row or step == pc.steps:
            eta = (time.time() - self.started) / (step - self.first_step + 1) * (pc.steps - step)
            held = f" held-out reward {row['eval_reward']:.3f} (KL {row['eval_kl']:.2f})" if "eval_reward" in row else ""
            print(f"[ppo] step {step}/{pc.steps} reward {row['reward']:.3f}±{row['reward_std']:.2f} KL {row['kl']:.3f} "
                  f"len {row['response_length']:.1f} clip {row['clip_fraction']:.2f}{held} | {row['samples_per_s']:.1f} "
                  f"samples/s (generate {row['generate_s']:.1f}s, score {row['score_s']:.1f}s, train {row['train_s']:.1f}s, "
                  f"sync {row['sync_s']:.2f}s) ETA {eta:,.0f}s", flush=True)

    def summary(self, model: str) -> dict:
        self.history.close()
        self.tensorboard.close()
        by_step = {}
        for line in (self.out / "history.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
        rows = [by_step[k] for k in sorted(by_step)]
        train = [r for r in rows if "reward" in r]
        evals = [r for r in rows if "eval_reward" in r]
        head, tail = train[:3], train[-3:]
        summary = {
            "steps": train[-1]["step"], "model": model,
            "first_reward": float(np.mean([r["reward"] for r in head])),
            "last_reward": float(np.mean([r["reward"] for r in tail])),
            "first_eval_reward": evals[0]["eval_reward"], "last_eval_reward": evals[-1]["eval_reward"],
            "first_eval_kl": evals[0]["eval_kl"], "last_eval_kl": evals[-1]["eval_kl"],
            "last_kl": float(np.mean([r["kl"] for r in tail])),
            "timing_s": {k: float(np.mean([r[k] for r in train])) for k in
                         ("generate_s", "score_s", "train_s", "sync_s", "step_s")},
            "samples_per_s": float(np.mean([r["samples_per_s"] for r in train])),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
