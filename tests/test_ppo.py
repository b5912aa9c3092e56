"""PPO with Ray actor roles on the real prompts: a verifiable reward is learned with bounded KL through a
killed learner rank (the job goes on from its last checkpoint), a rerun resumes from the last checkpoint,
the rollout engine decodes exactly like the learner after a weight push, and a killed rollout engine is
restarted in place with the current weights.
Under `ray job submit`: tests/test_architectures.py."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from clinicalgpt.config import load_config
from clinicalgpt.experience import build_batch
from conftest import SMALL_PPO, dashboard_api, history, isolated_run, ppo_args, scrape_metrics

pytestmark = pytest.mark.e2e


@pytest.mark.chaos
def test_ppo_learns_a_verifiable_reward_with_bounded_kl_through_a_killed_learner_then_resumes(trained, tmp_path, capsys,
                                                                                          prometheus):
    """20 steps with a learner rank killed during step 5: the job restarts the learner group from the step-3
    checkpoint (the other roles go on), redoes step 4 exactly, and still learns; a rerun with a larger budget then
    resumes. Prometheus has the Grafana dashboard's PPO panels, and the Ray dashboard lists the roles by name."""
    from jobs import ppo
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "sft"))
    run = load_config([f"run_root={run_root}"])
    trained_steps, killed = run.stage_dir("ppo") / "history.jsonl", []

    def kill_a_learner_after_step_4():
        while sum('"reward"' in line for line in (trained_steps.read_text().splitlines()
                                                  if trained_steps.exists() else [])) < 4:
            time.sleep(0.2)
        killed.append(time.time())
        ray.kill(ray.get_actor("learner-1"))  # as if its process or node died, during step 5

    threading.Thread(target=kill_a_learner_after_step_4, daemon=True).start()
    started = time.time()
    # PPO alone (ptx off): the rule reward's learning, without PPO-ptx's pull towards the SFT corpus (tested below).
    summary = ppo.main(ppo_args(run_root, cfg, 20, "ppo.checkpoint_every=3", "ppo.ptx_coef=0"))
    out = capsys.readouterr().out
    assert killed and "restarting the learner group from the last checkpoint" in out, out[-3000:]
    assert "resumed from step_000003: step 3" in out
    rows = [r for r in history(run, "ppo") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, *range(4, 21)], [r["step"] for r in rows]  # redone from step 3
    # The same weights, data position and seeds as before the failure: step 4 is redone exactly.
    assert rows[4]["reward"] == rows[3]["reward"] and rows[4]["kl"] == pytest.approx(rows[3]["kl"], abs=1e-4)
    assert summary["steps"] == 20
    recovered = float(out.split("[ppo] recovered in ")[1].split("s")[0])
    print(f"recovery: {recovered:.1f}s from the failure to training again")

    rows = rows[:3] + rows[4:]  # each step once
    rewards = [r["reward"] for r in rows]  # measured: first five -2.18, last five -1.67 (noisy: 32 samples a step)
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.25, rewards
    assert summary["last_eval_reward"] > summary["first_eval_reward"], summary  # held-out prompts, greedy
    assert max(r["kl"] for r in rows) < 15, [r["kl"] for r in rows]  # the KL penalty keeps it near the SFT model
    assert all(r["engine_logprob_gap"] < 1e-3 for r in rows), [r["engine_logprob_gap"] for r in rows]
    # The held-out answers' health at every held-out evaluation, checked against the SFT policy's (step 0).
    evals = [r for r in history(run, "ppo") if "eval_reward" in r]
    assert all({"eval_empty", "eval_degenerate", "eval_truncated", "eval_distinct2", "eval_exam_compliant"} <= set(r)
               for r in evals), evals
    assert evals[0]["step"] == 0 and all(r["health_alarm"] >= 0 for r in evals[1:]), evals
    assert {"clip_fraction", "approx_kl", "entropy", "value_loss", "explained_variance", "sync_s"} <= set(rows[-1])
    assert AutoModelForCausalLM.from_pretrained(summary["model"])  # the merged policy, HF format
    # The run's metrics reach Prometheus through the node's metrics endpoint, with the last step's values.
    names = {f"ray_clinicalgpt_ppo_{k}" for k in ("step", "reward", "kl", "generate_s", "train_s", "sync_s")}
    samples = scrape_metrics(names, ready=lambda found: max(s.value for s in found["ray_clinicalgpt_ppo_step"]) == 20)
    assert names <= set(samples), sorted(samples)
    assert max(s.value for s in samples["ray_clinicalgpt_ppo_step"]) == 20
    assert rows[-1]["reward"] in [s.value for s in samples["ray_clinicalgpt_ppo_reward"]]
    assert all(s.value > 0 for s in samples["ray_clinicalgpt_ppo_train_s"])
    if prometheus:  # every PPO panel of the Grafana dashboard has data on a real Prometheus
        print("PPO panels, points:", prometheus.check_panels("ppo", started))
        rules = [r for group in prometheus.api("rules")["groups"] for r in group["rules"]]
        assert [(r["name"], r["health"]) for r in rules] == [("PPOOutputsCollapsing", "ok")], rules  # evaluates
    actors = dashboard_api("/api/v0/actors", limit=10_000, detail="true")["data"]["result"]["result"]
    roles = {("RolloutActor", "rollout-0"), ("ReferenceActor", "reference-0"), ("RewardActor", "reward-0"),
             ("LearnerRank", "learner-0"), ("LearnerRank", "learner-1")}
    assert roles <= {(a["class_name"], a["name"]) for a in actors}, actors
    assert (run.stage_dir("ppo") / "adapter" / "adapter_config.json").exists()

    # A rerun with a larger budget resumes from the step-20 checkpoint instead of starting over.
    ppo.main(ppo_args(run_root, cfg, 22, "ppo.ptx_coef=0"))
    steps = [r["step"] for r in history(run, "ppo") if "reward" in r]
    assert steps == [1, 2, 3, 4, *range(4, 23)], steps


def test_a_checkpoint_being_written_never_replaces_the_last_good_one(tmp_path):
    from types import SimpleNamespace
    from clinicalgpt.rlhf.checkpoint import latest_checkpoint, save_checkpoint

    def learners_that_die_while_saving(method, folder):
        (Path(folder) / "policy").mkdir(parents=True)
        (Path(folder) / "policy" / "shard.pt").write_bytes(b"half")
        raise ray.exceptions.RayActorError()

    good = SimpleNamespace(call=lambda method, folder: Path(folder).mkdir(parents=True))
    save_checkpoint(tmp_path, good, {"step": 5})
    with pytest.raises(ray.exceptions.RayActorError):  # a learner died while writing step 10's shards
        save_checkpoint(tmp_path, SimpleNamespace(call=learners_that_die_while_saving), {"step": 10})
    assert (tmp_path / "step_000010.tmp").exists()
    assert latest_checkpoint(tmp_path).name == "step_000005"
    assert json.loads((latest_checkpoint(tmp_path) / "controller.json").read_text()) == {"step": 5}


def test_a_checkpoint_this_version_cannot_read_is_refused_with_what_to_do(tmp_path):
    from clinicalgpt.rlhf.checkpoint import load_checkpoint
    (tmp_path / "step_000003").mkdir()
    (tmp_path / "step_000003" / "controller.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(SystemExit, match=r"lacks beta, consumed: .* move .* away to start PPO afresh"):
        load_checkpoint(tmp_path, learners=None)


@pytest.fixture(scope="module", params=[
    pytest.param([], id="object_store"),  # CPUs here
    pytest.param(["ppo.weight_sync=nccl", "ppo.rollout.gpus=1", "ppo.learner.gpus=1", "ppo.learner.num=1"],
                 marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL broadcast needs 2 GPUs"),
                 id="nccl"),
])
def grpo_roles(trained, request):
    """PPO roles on the session's SFT model, scored by its reward model, started once for the tests below,
    which run in turn on them (last in this module: the roles hold their CPUs until its end): (cfg, roles,
    prompt stream)."""
    from clinicalgpt.rlhf.prompts import PromptStream
    from clinicalgpt.rlhf.roles import start_roles
    cfg, _ = trained
    # LoRA on part of a layer vLLM fuses (q of qkv, gate of gate_up): a push must still set those layers whole.
    # Recomputed activations (train mode, dropout off): the learner's log-probs must still match the engine's.
    cfg = load_config([f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}", *SMALL_PPO, "ppo.advantage=grpo",
                       "ppo.lora.targets=[q_proj,gate_proj]", "ppo.ptx_coef=0.5", "ppo.gradient_checkpointing=true",
                       "ppo.reward=model", *request.param])
    policy = str(cfg.stage_dir("sft") / "final")
    roles = start_roles(cfg, policy, str(cfg.stage_dir("rm") / "final"), critic=None)
    stream = PromptStream(cfg)
    yield cfg, roles, stream
    stream.close()
    roles.shutdown()


def test_after_a_weight_push_the_engine_decodes_exactly_like_the_learner(grpo_roles):
    from clinicalgpt.rlhf.step import ppo_step
    cfg, roles, stream = grpo_roles
    learner = roles.learners.ranks[0]
    prompts = stream.take(cfg.ppo.prompts_per_step)
    probe = build_batch(prompts[:4], [ray.get(learner.greedy.remote(p, 24)) for p in prompts[:4]], roles.pad_id)
    before = ray.get(learner.logprobs_and_values.remote(probe, 0.0))["logprobs"]  # greedy answers: temperature 0
    first = ppo_step(cfg, roles, prompts, 0.05, 0)  # trains, then pushes the new weights
    second = ppo_step(cfg, roles, stream.take(cfg.ppo.prompts_per_step), 0.05, 1)
    now = ray.get(learner.logprobs_and_values.remote(probe, 0.0))["logprobs"]
    moved = np.abs(now - before)[probe["response_mask"] > 0].max()
    after = [ray.get(learner.greedy.remote(p, 24)) for p in prompts[:4]]
    engine = [s["ids"] for p in prompts[:4] for s in ray.get(roles.rollout.engines[0].generate.remote([p], 1, 24, 0.0))]
    assert moved > 1e-3  # the policy did change (its greedy text may not, on a barely-trained model)
    assert engine == after  # greedy decoding in vLLM == transformers on the learner (fp32)
    # Sampled tokens scored by the engine and by the learner agree after each push.
    assert first["engine_logprob_gap"] < 1e-3 and second["engine_logprob_gap"] < 1e-3
    assert np.isfinite(first["reward"]) and first["reward"] != second["reward"]  # the reward model's scores


def test_the_engine_scores_continuations_of_a_cached_prompt_like_the_learner(grpo_roles):
    """The evaluation's exam option likelihoods: continuations of one prompt reuse its cached blocks (32 tokens on
    CPUs); one whose cache hit reaches into its continuation is scored again. Both agree with the learner."""
    cfg, roles, stream = grpo_roles
    tokens = [t for p in stream.take(8) for t in p]
    head = tokens[:70]
    answers = [tokens[100:103], tokens[100:102] + [tokens[110]], tokens[120:125]]  # two share their first tokens
    # The first 64 tokens of the prompts cached; the 64-token prompt's hit then ends where its continuation starts.
    prompts, continuations = [head, head[:64]] * 3, [a for a in answers for _ in range(2)]
    engine = roles.rollout.engines[0]
    ray.get(engine.continuation_logprobs.remote([head], [answers[0]]))
    scored = ray.get(engine.continuation_logprobs.remote(prompts, continuations))
    batch = build_batch(prompts, continuations, roles.pad_id)
    learner = ray.get(roles.learners.ranks[0].logprobs_and_values.remote(batch, 0.0))["logprobs"]
    for i, c in enumerate(continuations):
        assert len(scored[i]) == len(c)
        assert np.abs(np.array(scored[i]) - learner[i][batch["response_mask"][i] > 0]).max() < 1e-3, i


def test_a_degenerate_response_scores_ppo_degenerate_score_and_the_held_out_reward_stays_the_reward_models(grpo_roles):
    import dataclasses
    from clinicalgpt.rlhf.step import held_out_reward, score
    cfg, roles, stream = grpo_roles
    prompt = stream.take(1)[0]
    # One phrase over and over; an answer; nothing but the end of the text.
    replies = [roles.tokenizer.encode(r, add_special_tokens=False)
               for r in ("小儿治疗、" * 6, "头痛三天，伴有发热，建议先查血常规。")]
    batch = build_batch([prompt] * 3, [*replies, [roles.tokenizer.eos_token_id]], roles.pad_id)
    cut = np.array([False, False, False])
    plain = score(cfg, roles, batch, cut, 1.0)
    penalized = score(dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, degenerate_score=-3.0)), roles, batch,
                      cut, 1.0)
    assert (plain["scores"] == plain["rewards"]).all() and plain["rewards"][0] != -3.0
    assert penalized["scores"][0] == penalized["scores"][2] == -3.0 and penalized["scores"][1] == plain["scores"][1]
    # The reward model's own scores stay beside the penalised ones, and the held-out reward reports them: an arm with
    # penalties and one without compare on the same scale.
    assert (penalized["rewards"] == plain["rewards"]).all()
    shaping = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, degenerate_score=-3.0, length_penalty=1.0))
    prompts = stream.take(4)
    held_out = [held_out_reward(c, roles, prompts, [])["eval_reward"] for c in (shaping, cfg)]
    assert held_out[0] == held_out[1], held_out


def test_ptx_adds_the_language_model_loss_of_the_sft_stream_to_each_policy_update(grpo_roles):
    from clinicalgpt import rl
    from clinicalgpt.rlhf.prompts import PtxStream
    from clinicalgpt.rlhf.step import ppo_step
    from clinicalgpt.trainer import causal_lm_loss
    cfg, roles, stream = grpo_roles
    ptx_stream = PtxStream(cfg)
    rows = ptx_stream.take(cfg.ppo.learner.num * rl.ptx_rows_per_rank(cfg.ppo))  # 2 ranks x 2 epochs x 2 updates
    ptx_stream.close()
    assert len(rows["input_ids"]) == 2 * 2 * (8 * 4 // 2 // (16 // 2)) and rows["input_ids"].shape[1] == cfg.seq.max_len
    row = ppo_step(cfg, roles, stream.take(cfg.ppo.prompts_per_step), 0.05, 10, rows)
    # The SFT model's own loss on those rows, row by row as the updates take them (LoRA moves it little meanwhile).
    sft = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "final")
    with torch.no_grad():
        by_hand = np.mean([causal_lm_loss(sft, {k: torch.as_tensor(v[i:i + 1]) for k, v in rows.items()})[0].item()
                           for i in range(len(rows["input_ids"]))])
    assert row["ptx_loss"] == pytest.approx(by_hand, abs=0.1), (row["ptx_loss"], by_hand)
    assert np.isfinite(row["policy_loss"]) and row["policy_loss"] != row["ptx_loss"]


@pytest.mark.chaos
def test_a_killed_rollout_engine_is_restarted_with_the_current_weights(grpo_roles, capsys):
    from clinicalgpt.rlhf.step import ppo_step
    cfg, roles, stream = grpo_roles
    before = ppo_step(cfg, roles, stream.take(cfg.ppo.prompts_per_step), 0.05, 2)  # pushes a new version
    version = roles.rollout.version
    ray.kill(roles.rollout.engines[0], no_restart=False)  # Ray rebuilds it, with the SFT weights it was built from
    after = ppo_step(cfg, roles, stream.take(cfg.ppo.prompts_per_step), 0.05, 3)
    assert f"a rollout engine was restarted; weights version {version} pushed" in capsys.readouterr().out
    # The rebuilt engine sampled with the trained policy, not the SFT weights: its log-probs match the learner's.
    assert after["step"] == 4 and after["engine_logprob_gap"] < 1e-3, after["engine_logprob_gap"]
    print(f"recovery: generate took {after['generate_s'] - before['generate_s']:.1f}s longer than before the kill")
