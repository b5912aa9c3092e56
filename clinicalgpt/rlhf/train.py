"""The PPO run: its inputs checked before anything starts, the roles started (or resumed from the last
checkpoint), steps until ppo.steps with held-out rewards and checkpoints, recovery when a role dies, and
the final policy exported."""

from __future__ import annotations

import time

import ray

from .. import rl
from ..config import Config
from ..reward_functions import parse_reward, reward_function_for
from .checkpoint import load_checkpoint, save_checkpoint
from .log import Log
from .prompts import PromptStream, PtxStream, held_out_exam, held_out_prompts
from .roles import Roles, start_roles, weight_sync_mode
from .step import held_out_reward, ppo_step


def check_inputs(cfg: Config) -> tuple[str, str, str | None]:
    """(policy, reward model, critic) paths, or a message saying what is wrong or what to run first."""
    ppo = cfg.ppo
    try:
        kind, _ = parse_reward(ppo.reward)
        if kind != "model":
            reward_function_for(ppo.reward)  # a rule's argument, or a user's module, fails here and not in an actor
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for setting, registry in (("kl_controller", rl.KL_CONTROLLERS), ("kl_estimator", rl.KL_ESTIMATORS),
                              ("advantage", rl.ADVANTAGE_ESTIMATORS)):
        if getattr(ppo, setting) not in registry:
            raise SystemExit(f"ppo.{setting}={getattr(ppo, setting)!r}: one of {', '.join(registry)}")
    min_samples = rl.ADVANTAGE_ESTIMATORS[ppo.advantage].min_samples
    if ppo.samples_per_prompt < min_samples:
        raise SystemExit(f"ppo.advantage={ppo.advantage} compares the samples of a prompt: it needs "
                         f"ppo.samples_per_prompt >= {min_samples}, got {ppo.samples_per_prompt}")
    policy, rm = cfg.stage_dir("sft") / "final", cfg.stage_dir("rm") / "final"
    if not (policy / "config.json").exists():
        raise SystemExit(f"no SFT model at {policy}: run the earlier stages first "
                         f"(python jobs/recipe.py preset={cfg.preset}, or jobs/sft.py after data, bootstrap, pretrain)")
    if kind == "model" and not (rm / "config.json").exists():
        raise SystemExit(f"no reward model at {rm}: run python jobs/rm.py preset={cfg.preset} first "
                         "(or use a rule reward, e.g. ppo.reward=length:16)")
    weight_sync_mode(cfg)
    if ppo.length_group < 1 or ppo.forward_rows < 1:
        raise SystemExit(f"ppo.length_group ({ppo.length_group}) and ppo.forward_rows ({ppo.forward_rows}) must be >= 1")
    rows, ranks = ppo.prompts_per_step * ppo.samples_per_prompt, ppo.learner.num
    if ppo.minibatch % ranks or rows % ranks or rows // ranks < ppo.minibatch // ranks:
        raise SystemExit(f"ppo: {rows} responses per step and minibatch {ppo.minibatch} must both divide "
                         f"among {ranks} learner ranks, with at least one minibatch per rank")
    # The prompt stream's read tasks (1 CPU) and tokenizer actor (0.5) run beside the roles.
    need = sum(r.num * r.cpus for r in (ppo.rollout, ppo.reference, ppo.reward_model, ppo.learner)) + 1.5
    if ray.cluster_resources().get("CPU", 0) < need:
        raise SystemExit(f"the Ray cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs; PPO needs {need:g} "
                         "(its roles plus 1.5 for the prompt stream): start it with more, e.g. "
                         "`ray start --head --num-cpus=4` (logical CPUs may exceed the cores), or give roles fewer")
    # The critic starts from the reward model it learns to predict; under a reward function the RM's scores
    # mean nothing, so from the SFT model with a new, zeroed head (advantages start as the whitened returns).
    uses_critic = rl.ADVANTAGE_ESTIMATORS[ppo.advantage].uses_critic
    critic = None if not uses_critic else str(rm if kind == "model" else policy)
    return str(policy), str(rm if kind == "model" else policy), critic


def resume(cfg: Config, roles: Roles) -> tuple[int, int, rl.FixedKL]:
    """(step, prompts consumed, KL controller) from the last checkpoint, its weights in the roles; a fresh
    start without one."""
    kl_controller = rl.KL_CONTROLLERS[cfg.ppo.kl_controller](cfg.ppo)
    state = load_checkpoint(cfg.stage_dir("ppo") / "checkpoints", roles.learners)
    if state is None:
        return 0, 0, kl_controller
    roles.rollout.push_weights()
    kl_controller.beta = state["beta"]
    return state["step"], state["consumed"], kl_controller


def ptx_stream(cfg: Config, step: int) -> PtxStream | None:
    """PPO-ptx's LM rows from where `step` steps left them (None with ppo.ptx_coef 0)."""
    ppo = cfg.ppo
    return PtxStream(cfg, skip=step * ppo.learner.num * rl.ptx_rows_per_rank(ppo)) if ppo.ptx_coef else None


def train(cfg: Config) -> dict:
    """The whole PPO stage on the connected Ray cluster; its summary."""
    policy, reward_model, critic = check_inputs(cfg)
    ppo, out = cfg.ppo, cfg.stage_dir("ppo")
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)

    started = time.time()
    roles = start_roles(cfg, policy, reward_model, critic)
    step, consumed, kl_controller = resume(cfg, roles)
    print(f"[ppo] roles up in {time.time() - started:.1f}s: {ppo.rollout.num} rollout, {ppo.reference.num} reference, "
          f"{ppo.reward_model.num} reward, {ppo.learner.num} learner rank(s); reward {ppo.reward}, "
          f"advantage {ppo.advantage}, weights by {roles.rollout.weight_sync}", flush=True)

    stream, ptx = PromptStream(cfg, consumed), ptx_stream(cfg, step)
    eval_prompts, eval_exam = held_out_prompts(cfg), held_out_exam(cfg)
    log = Log(cfg, out)
    if step == 0:
        log.write({"step": 0, **held_out_reward(cfg, roles, eval_prompts, eval_exam)})
    failures = 0
    while step < ppo.steps:
        try:
            ptx_rows = ptx.take(ppo.learner.num * rl.ptx_rows_per_rank(ppo)) if ptx else None
            row = ppo_step(cfg, roles, stream.take(ppo.prompts_per_step), kl_controller.beta, step, ptx_rows)
            kl_controller.update(row["kl"], ppo.prompts_per_step * ppo.samples_per_prompt)
            row["skipped_long_prompts"] = stream.skipped_long
            if row["step"] % ppo.eval_every == 0 or row["step"] == ppo.steps:
                row.update(held_out_reward(cfg, roles, eval_prompts, eval_exam))
            log.write(row)
            step = row["step"]
            if step % ppo.checkpoint_every == 0 or step == ppo.steps:
                save_checkpoint(checkpoints, roles.learners,
                                {"step": step, "consumed": stream.consumed, "beta": kl_controller.beta})
        except ray.exceptions.RayError:
            failed = time.time()
            dead = roles.dead()
            if failures == ppo.max_failures or not dead:
                raise
            failures += 1
            stream.close()
            if ptx:
                ptx.close()
            # A dead learner rank takes its peers' collectives down: the learner group restarts, the other roles
            # keep running. With NCCL weight sync the engines' transfer groups are with learner rank 0: all restart.
            if all(actor in roles.learners.ranks for actor in dead) and roles.rollout.weight_sync != "nccl":
                print(f"[ppo] a learner rank died during step {step + 1} (failure {failures} of {ppo.max_failures} "
                      "allowed): restarting the learner group from the last checkpoint", flush=True)
                roles.restart_learners(cfg, policy, critic)
            else:
                print(f"[ppo] a role died during step {step + 1} (failure {failures} of {ppo.max_failures} allowed): "
                      "restarting the roles from the last checkpoint", flush=True)
                roles.shutdown()
                roles = start_roles(cfg, policy, reward_model, critic)
            step, consumed, kl_controller = resume(cfg, roles)
            stream, ptx = PromptStream(cfg, consumed), ptx_stream(cfg, step)
            print(f"[ppo] recovered in {time.time() - failed:.1f}s: training goes on from step {step + 1}", flush=True)

    stream.close()
    if ptx:
        ptx.close()
    roles.learners.call("export", str(out / "final"))
    roles.shutdown()
    return log.summary(str(out / "final"))
