"""The paper's base architecture, BLOOM (ALiBi, fused query_key_value, no sample packing), as any Hugging Face model
comes in: `preset=hf model.path=<folder>`. A tiny randomly initialised BLOOM built with the project's tokenizer goes
through SFT (LoRA on all its linear layers) and PPO with vLLM's BLOOM as the rollout engine, whose log-probs after
a weight push equal the learner's."""

import json

import pytest

from clinicalgpt.config import ModelConfig, load_config
from clinicalgpt.modeling import build_model
from clinicalgpt.tokenizer import load_tokenizer
from conftest import SMALL_PPO, history, stage_args

pytestmark = pytest.mark.e2e


def test_a_bloom_model_from_its_folder_goes_through_sft_and_ppo_with_vllm(built, tmp_path):
    from jobs import ppo, sft
    cfg, _ = built
    tok = load_tokenizer(cfg.model_path)
    base = tmp_path / "bloom-base"
    build_model(ModelConfig(arch="bloom"), tok).save_pretrained(base)
    tok.save_pretrained(base)
    run_root = tmp_path / "runs"
    # The session's records; its own packed streams (one sample a row), beside them and not over the session's.
    (run_root / "hf" / "data").mkdir(parents=True)
    (run_root / "hf" / "data" / "records").symlink_to(cfg.data_dir / "records")
    # Rows of 128 tokens: without packing each sample fills a row of its own (longer ones are skipped, counted).
    argv = ["preset=hf", f"model.path={base}", f"run_root={run_root}", f"data.root={cfg.data_root}", "seq.max_len=128"]
    run = load_config(argv)
    assert (run.seq.pack, run.model.dtype, run.sft.lora.targets) == (False, "float32", ["all-linear"])

    # A small share of every task, so that packing the stream anew (one sample a row) takes seconds.
    fractions = json.dumps({t: 0.01 for t in ("kg_qa", "community_qa", "exam", "dialogue", "diagnosis")})
    summary = sft.main(argv + stage_args("sft", 6) + [f"sft.task_fractions={fractions}"])
    assert summary["last_eval_loss"] < summary["first_eval_loss"], summary
    adapted = json.loads((run.stage_dir("sft") / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {name.split(".")[-1] for name in adapted} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}

    # PPO from that SFT model: a rule reward and group-relative advantages (no reward model or critic to train).
    # The random model's answers all run to the limit, so every advantage is 0: PPO-ptx's LM loss moves the weights.
    ppo.main(argv + ["ppo.steps=2", "ppo.eval_every=10", "ppo.checkpoint_every=10", "ppo.advantage=grpo", *SMALL_PPO])
    rows = [r for r in history(run, "ppo") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    # Step 2 samples from the engine after the first push of changed weights (a KL to the reference now): its
    # log-probs of its own tokens are the learner's (measured 7.6e-6).
    assert rows[0]["kl"] < 1e-6 and rows[1]["kl"] > 0.01, rows
    assert all(r["engine_logprob_gap"] < 1e-3 for r in rows), [r["engine_logprob_gap"] for r in rows]
    assert (run.stage_dir("ppo") / "final" / "config.json").exists()
