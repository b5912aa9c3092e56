"""Training stages on Ray Train + DeepSpeed ZeRO-2 with the real corpora: held-out losses fall, the
exports load in Hugging Face format, and a rerun after an interrupted job resumes instead of restarting."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from clinicalgpt.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SHORT = ["global_batch=16", "micro_batch=8", "eval_rows=32", "log_every=2"]


def stage_args(stage: str, steps: int, **extra) -> list[str]:
    extra = {"max_steps": steps, "eval_every": max(1, steps // 2), "checkpoint_every": steps, **extra}
    return [f"{stage}.{a}" for a in SHORT] + [f"{stage}.{k}={v}" for k, v in extra.items()]


def history(cfg, stage: str) -> list[dict]:
    return [json.loads(x) for x in (cfg.stage_dir(stage) / "history.jsonl").read_text().splitlines()]


def test_pretrain_held_out_loss_falls_then_sft_exports_lora_and_merged_models(built):
    from jobs import pretrain, sft
    cfg, _ = built
    argv = [f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}"]
    pt = pretrain.main(argv + stage_args("pretrain", 16, lr=3e-3))
    assert pt["last_eval_loss"] < pt["first_eval_loss"] - 1.0, pt
    assert AutoModelForCausalLM.from_pretrained(pt["model"])  # exported in HF format

    sft.main(argv + stage_args("sft", 2))
    assert (cfg.stage_dir("sft") / "adapter" / "adapter_config.json").exists()  # the LoRA adapter
    merged = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "final")  # merged: no LoRA layers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (cfg.stage_dir("sft") / "tensorboard").iterdir()


def test_rerun_after_an_interrupted_job_resumes_from_its_checkpoint(built, tmp_path):
    cfg, _ = built
    # A separate run folder that shares the built data and base model.
    run_root = tmp_path / "runs"
    (run_root / cfg.preset).mkdir(parents=True)
    for name in ("data", "base"):
        (run_root / cfg.preset / name).symlink_to(cfg.run_dir / name)
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}"] + stage_args("pretrain", 8, checkpoint_every=2)
    job = [sys.executable, str(REPO / "jobs" / "pretrain.py"), *argv]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local cluster, like a user's separate run
    run = load_config(argv)

    proc = subprocess.Popen(job, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hist = run.stage_dir("pretrain") / "history.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (hist.exists() and len(hist.read_text().splitlines()) >= 5):
        time.sleep(1)
    proc.kill()  # interrupted mid-run, with checkpoints every 2 steps behind it
    proc.wait()
    done_before = len(history(run, "pretrain"))
    assert 5 <= done_before < 8

    subprocess.run(job, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = [h["step"] for h in history(run, "pretrain")]
    resumed_at = steps[done_before]  # the rerun's first step
    assert 1 < resumed_at <= done_before + 1 and (resumed_at - 1) % 2 == 0, steps  # right after a checkpoint
    assert steps[-1] == 8
