"""The paper's base architecture, BLOOM (ALiBi, fused query_key_value, no sample packing), as any Hugging Face model
comes in: `preset=hf model.path=<folder>`. A tiny randomly initialised BLOOM built with the project's tokenizer goes
through SFT (LoRA on all its linear layers), then PPO as users run it on a cluster: `ray job submit` to a head
started with `ray start --head`, scored by a user's reward function from the job's working directory, with vLLM's
BLOOM as the rollout engine, whose log-probs after a weight push equal the learner's."""

import json

import pytest

from clinicalgpt.config import ModelConfig, load_config
from clinicalgpt.modeling import build_model
from clinicalgpt.tokenizer import load_tokenizer
from conftest import SMALL_PPO, history, stage_args, submit_job

pytestmark = pytest.mark.e2e


def test_a_bloom_model_from_its_folder_goes_through_sft_and_a_submitted_ppo_job(built, tmp_path, ray_head):
    from jobs import sft
    cfg, _ = built
    tok = load_tokenizer(cfg.model_path)
    base = tmp_path / "bloom-base"
    build_model(ModelConfig(arch="bloom"), tok).save_pretrained(base)
    tok.save_pretrained(base)
    run_root = tmp_path / "runs"
    # The session's records; its own packed streams (one sample a row), beside them and not over the session's.
    (run_root / "hf" / "data").mkdir(parents=True)
    (run_root / "hf" / "data" / "records").symlink_to(cfg.data_dir / "records")
    # Rows of 128 tokens: without packing each sample fills a row of its own (longer ones are skipped, counted). A
    # small share of every task, so that packing the SFT stream anew (one sample a row) takes seconds; PPO-ptx reads
    # the same stream, so the PPO job, with the run's settings, packs nothing again.
    fractions = json.dumps({t: 0.01 for t in ("kg_qa", "community_qa", "exam", "dialogue", "diagnosis")})
    argv = ["preset=hf", f"model.path={base}", f"run_root={run_root}", f"data.root={cfg.data_root}", "seq.max_len=128",
            f"sft.task_fractions={fractions}"]
    run = load_config(argv)
    assert (run.seq.pack, run.model.dtype, run.sft.lora.targets) == (False, "float32", ["all-linear"])

    summary = sft.main(argv + stage_args("sft", 6))
    assert summary["last_eval_loss"] < summary["first_eval_loss"], summary
    adapted = json.loads((run.stage_dir("sft") / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {name.split(".")[-1] for name in adapted} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}

    # PPO from that SFT model, submitted as a job: a user's function is the reward, imported inside the reward actor
    # from the job's working directory and configured by an environment variable of the submitted runtime env, which
    # also sets variables the job itself sets (Ray refuses conflicting keys between the two: the job must not pass
    # them again). Group-relative advantages: no reward model or critic to train.
    reward = "python:tests.user_rewards:answer_length"
    user_env = {"env_vars": {"ANSWER_CHARS": "10000", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    out = submit_job(ray_head, tmp_path, "python", "jobs/ppo.py", *argv, "ppo.steps=2", "ppo.eval_every=10",
                     "ppo.checkpoint_every=10", "ppo.advantage=grpo", *SMALL_PPO, f"ppo.reward={reward}",
                     runtime_env=user_env)
    assert "succeeded" in out, out[-3000:]
    assert f"reward {reward}," in out and "[ppo] done" in out
    rows = history(run, "ppo")
    # -|characters - 10000| / 10000 of answers of 24 tokens at most: in [-1, -0.95]
    assert all(-1 <= r[k] <= -0.95 for r in rows for k in ("reward", "eval_reward") if k in r), rows
    rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    # Step 2 samples from the engine after the first push of changed weights (a KL to the reference now): its
    # log-probs of its own tokens are the learner's (measured 7.6e-6).
    assert rows[0]["kl"] < 1e-6 and rows[1]["kl"] > 0.01, rows
    assert all(r["engine_logprob_gap"] < 1e-3 for r in rows), [r["engine_logprob_gap"] for r in rows]
    assert (run.stage_dir("ppo") / "final" / "config.json").exists()
