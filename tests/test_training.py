"""Training stages on Ray Train + DeepSpeed ZeRO-2 with the real corpora: held-out losses fall, the
exports load in Hugging Face format, a killed worker is replaced, a rerun after an interrupted job
resumes instead of restarting, and a run across two nodes survives losing one. Under `ray job submit`:
tests/test_job_submit.py."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from clinicalgpt.config import load_config
from conftest import REPO, history, isolated_run, scrape_metrics, stage_args

pytestmark = pytest.mark.e2e
TRAIN_METRICS = {"ray_clinicalgpt_train_loss", "ray_clinicalgpt_train_tokens_per_s", "ray_clinicalgpt_train_step",
                 "ray_data_operator_queued_blocks"}


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
    # What it trained on, per source: the held-out pairs are about a twentieth of each constructed kind.
    for source in ("constructed/kg_swap", "constructed/kg_wrong_kind", "constructed/exam_wrong_option"):
        row = accuracy["per_source"][source]
        assert 8 < row["train_pairs"] / row["pairs"] < 40, (source, row)
    assert all(0 <= row["base_likelihood"] <= 1 for row in accuracy["per_source"].values())
    table = (cfg.stage_dir("rm") / "accuracy.md").read_text()
    assert "| longer-reply baseline | SFT likelihood baseline |" in table
    scorer = AutoModelForSequenceClassification.from_pretrained(summary["model"])
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id is not None


def wait_for_steps(path: Path, n: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (path.exists() and len(path.read_text().splitlines()) >= n):
        time.sleep(1)
    assert proc.poll() is None, "the job ended before it was interrupted"


@pytest.mark.chaos
def test_training_goes_on_after_a_killed_worker_an_interrupted_job_and_with_fewer_workers(built, tmp_path):
    """Three faults in turn on one run folder, each run its own local cluster like a user's separate run:
    a rank dies (the job replaces it and goes on from the last checkpoint), then the job itself is killed
    (a rerun resumes instead of restarting), then it goes on with fewer workers than saved its checkpoint."""
    cfg, _ = built
    run_root = isolated_run(cfg, tmp_path)
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}"] + stage_args(
        "pretrain", 8, checkpoint_every=2, min_workers=1, num_workers=2)
    job = [sys.executable, str(REPO / "jobs" / "pretrain.py"), *argv]
    env = {**os.environ, "RAY_ADDRESS": ""}
    run = load_config(argv)
    path, log = run.stage_dir("pretrain") / "history.jsonl", tmp_path / "job.log"
    with log.open("w") as out:
        proc = subprocess.Popen(job, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_steps(path, 3, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].kill()  # one rank dies mid-run; the job itself keeps going
        wait_for_steps(path, 6, proc)  # replaced: steps after the last checkpoint are redone
        proc.kill()  # then the job is interrupted, with checkpoints every 2 steps behind it
        proc.wait()
    steps = [h["step"] for h in history(run, "pretrain")]
    assert len(steps) > len(set(steps)) and max(steps) < 8, steps
    assert "resumed from step" in log.read_text()

    done_before = len(steps)
    subprocess.run(job, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = [h["step"] for h in history(run, "pretrain")]
    resumed_at = steps[done_before]  # the rerun's first step
    assert 1 < resumed_at <= max(steps[:done_before]) + 1 and (resumed_at - 1) % 2 == 0, steps  # right after a checkpoint
    assert steps[-1] == 8

    # Elastic: the run goes on with fewer workers than saved its checkpoint (weights restore; ZeRO-2's
    # per-rank optimizer shards cannot).
    more = argv + ["pretrain.max_steps=10", "pretrain.num_workers=1", "pretrain.min_workers=0"]
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), *more], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step 8 on 1 worker(s) (saved by 2" in done.stdout + done.stderr
    assert [h["step"] for h in history(run, "pretrain")][-2:] == [9, 10]


@pytest.mark.chaos
def test_sft_across_two_nodes_goes_on_from_its_last_checkpoint_when_a_node_is_removed(trained, tmp_path):
    from ray.cluster_utils import Cluster
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "pretrain"))
    # Three Ray nodes on this machine: the head (driver, Train controller, Ray Data) and two worker nodes
    # that fit one 2.5-CPU training worker each (the head fits none), so the two ranks run on different nodes.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}", f"ray.address={cluster.address}"] + stage_args(
        "sft", 9, checkpoint_every=3, eval_every=3, min_workers=1, num_workers=2, cpus_per_worker=2.5)
    run = load_config(argv)
    path, log = run.stage_dir("sft") / "history.jsonl", tmp_path / "sft.log"
    try:
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sft.py"), *argv],
                                    env={**os.environ, "RAY_ADDRESS": ""}, stdout=out, stderr=subprocess.STDOUT)
        # Meanwhile the nodes' metrics endpoints serve the training gauges and Ray Data's queue depths.
        endpoints = [f"{n.node_ip_address}:{n.metrics_export_port}" for n in cluster.list_all_nodes()]
        scraped = {}
        scraper = threading.Thread(target=lambda: scraped.update(scrape_metrics(TRAIN_METRICS, endpoints, 300)))
        wait_for_steps(path, 2, proc)
        scraper.start()
        wait_for_steps(path, 5, proc)
        removed_after = len(path.read_text().splitlines())
        cluster.remove_node(nodes[1], allow_graceful=False)  # a node lost mid-run, with its training worker
        removed_at = time.time()
        wait_for_steps(path, removed_after + 1, proc, timeout=600)
        recovery = time.time() - removed_at
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        scraper.join()
    finally:
        proc.kill()
        cluster.shutdown()
    rows = history(run, "sft")
    steps = [r["step"] for r in rows]
    resumed_at = steps[removed_after]
    # Resumed right after a checkpoint no more than one interval back, never from the start; then finished.
    assert (resumed_at - 1) % 3 == 0 and removed_after - 3 < resumed_at <= removed_after + 1, steps
    assert steps[-1] == 9 and (run.stage_dir("sft") / "final" / "config.json").exists()
    first_time = {r["step"]: r["lr"] for r in rows[:removed_after]}  # the schedule goes on where it was
    assert all(r["lr"] == pytest.approx(first_time[r["step"]]) for r in rows[removed_after:] if r["step"] in first_time)
    # One worker took over with the checkpoint's weights: their held-out loss is the one logged at that step.
    text = log.read_text()
    restored = float(text.split(f"resumed from step {resumed_at - 1} on 1 worker(s)")[1].split("held-out loss ")[1][:6])
    logged = next(r["eval_loss"] for r in rows if r["step"] == resumed_at - 1)
    assert restored == pytest.approx(logged, abs=1e-3), (restored, logged)
    assert TRAIN_METRICS <= set(scraped), sorted(scraped)
    assert {s.labels["stage"] for s in scraped["ray_clinicalgpt_train_loss"]} == {"sft"}
    assert 1 <= max(s.value for s in scraped["ray_clinicalgpt_train_step"]) <= 9
    assert all(0 < s.value < 20 for s in scraped["ray_clinicalgpt_train_loss"])
    assert all(s.value > 0 for s in scraped["ray_clinicalgpt_train_tokens_per_s"])
    print(f"recovery: {recovery:.1f}s from the node's removal to the next step; resumed at step {resumed_at}")
