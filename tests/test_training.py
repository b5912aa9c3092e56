"""Training stages on Ray Train + DeepSpeed ZeRO-2 with the real corpora: held-out losses fall, the
exports load in Hugging Face format, a rerun after an interrupted job resumes instead of restarting, a
killed worker is replaced, and a stage runs under `ray job submit`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from clinicalgpt.config import load_config
from conftest import REPO, history, isolated_run, stage_args, submit_job

pytestmark = pytest.mark.slow


def test_pretrain_held_out_loss_falls_then_sft_and_rm_export_hf_models(trained):
    cfg, summaries = trained
    pt = summaries["pretrain"]
    assert pt["last_eval_loss"] < pt["first_eval_loss"] - 1.0, pt
    assert AutoModelForCausalLM.from_pretrained(pt["model"])  # exported in HF format

    assert (cfg.stage_dir("sft") / "adapter" / "adapter_config.json").exists()  # the LoRA adapter
    merged = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "final")  # merged: no LoRA layers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (cfg.stage_dir("sft") / "tensorboard").iterdir()

    summary = summaries["rm"]
    accuracy = json.loads((cfg.stage_dir("rm") / "accuracy.json").read_text())
    assert accuracy["overall"] == summary["accuracy"] and accuracy["pairs"] > 500
    # Held-out pairs of every kind: the constructed factual errors and the preference corpora's subsets.
    assert {"constructed/kg_swap", "constructed/kg_wrong_kind", "constructed/exam_wrong_option",
            "pulse_eval/WebMedQA"} <= set(accuracy["per_source"])
    assert sum(v["pairs"] for v in accuracy["per_source"].values()) == accuracy["pairs"]
    assert "longer-reply baseline" in (cfg.stage_dir("rm") / "accuracy.md").read_text()
    scorer = AutoModelForSequenceClassification.from_pretrained(summary["model"])
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id is not None


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


def test_a_stage_runs_under_ray_job_submit(built, tmp_path, ray_head):
    cfg, _ = built
    run_root = isolated_run(cfg, tmp_path)
    out = submit_job(ray_head, tmp_path, "python", "jobs/pretrain.py", f"run_root={run_root}",
                     f"data.root={cfg.data_root}", *stage_args("pretrain", 2))
    assert "succeeded" in out, out[-3000:]
    assert [h["step"] for h in history(load_config([f"run_root={run_root}"]), "pretrain")] == [1, 2]
    assert (run_root / cfg.preset / "pretrain" / "final" / "config.json").exists()
