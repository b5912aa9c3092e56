"""Training stages on Ray Train + DeepSpeed ZeRO-2 with the real corpora: held-out losses fall, the
exports load in Hugging Face format, and a rerun after an interrupted job resumes instead of restarting."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
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


def isolated_run(cfg, tmp_path: Path) -> Path:
    """A separate run folder that shares the built data and base model."""
    run_root = tmp_path / "runs"
    (run_root / cfg.preset).mkdir(parents=True)
    for name in ("data", "base"):
        (run_root / cfg.preset / name).symlink_to(cfg.run_dir / name)
    return run_root


def wait_for_steps(path: Path, n: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (path.exists() and len(path.read_text().splitlines()) >= n):
        time.sleep(1)
    assert proc.poll() is None, "the job ended before it was interrupted"


def test_rerun_after_an_interrupted_job_resumes_from_its_checkpoint(built, tmp_path):
    cfg, _ = built
    run_root = isolated_run(cfg, tmp_path)
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}"] + stage_args("pretrain", 8, checkpoint_every=2)
    job = [sys.executable, str(REPO / "jobs" / "pretrain.py"), *argv]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local cluster, like a user's separate run
    run = load_config(argv)

    proc = subprocess.Popen(job, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(run.stage_dir("pretrain") / "history.jsonl", 5, proc)
    proc.kill()  # interrupted mid-run, with checkpoints every 2 steps behind it
    proc.wait()
    done_before = len(history(run, "pretrain"))
    assert 5 <= done_before < 8

    subprocess.run(job, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = [h["step"] for h in history(run, "pretrain")]
    resumed_at = steps[done_before]  # the rerun's first step
    assert 1 < resumed_at <= done_before + 1 and (resumed_at - 1) % 2 == 0, steps  # right after a checkpoint
    assert steps[-1] == 8


def test_a_killed_worker_is_replaced_and_training_goes_on_from_the_last_checkpoint(built, tmp_path):
    cfg, _ = built
    run_root = isolated_run(cfg, tmp_path)
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}"] + stage_args(
        "pretrain", 8, checkpoint_every=2, min_workers=1, num_workers=2)
    env = {**os.environ, "RAY_ADDRESS": ""}
    run = load_config(argv)
    log = tmp_path / "job.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *argv], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        wait_for_steps(run.stage_dir("pretrain") / "history.jsonl", 3, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].kill()  # one rank dies mid-run; the job itself keeps going
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    steps = [h["step"] for h in history(run, "pretrain")]
    assert steps[-1] == 8 and len(steps) > len(set(steps)), steps  # steps after the last checkpoint were redone
    assert "resumed from step" in log.read_text()

    # Elastic: the run goes on with fewer workers than saved its checkpoint (weights restore; ZeRO-2's
    # per-rank optimizer shards cannot).
    more = argv + ["pretrain.max_steps=10", "pretrain.num_workers=1", "pretrain.min_workers=0"]
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), *more], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step 8 on 1 worker(s) (saved by 2" in done.stdout + done.stderr
    assert [h["step"] for h in history(run, "pretrain")][-2:] == [9, 10]
