"""Training stages on Ray Train + DeepSpeed ZeRO-2 with the real corpora: held-out losses fall, the
exports load in Hugging Face format, and a run across two nodes survives a killed worker and then a lost
node. An interrupted job resumed under `ray job submit`: tests/test_job_submit.py."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pyarrow.compute as pc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from clinicalgpt import reward_model
from clinicalgpt.config import load_config
from clinicalgpt.tokenizer import load_tokenizer
from conftest import REPO, cluster_settings, history, isolated_run, scrape_metrics, stage_args, wait_for_step

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
    # What it trained on, per source: a twentieth of each constructed kind is held out, so about 19 training
    # pairs per held-out pair, times the source's share (rm.pair_fractions), of the reward model's half of them.
    for source in ("constructed/kg_swap", "constructed/kg_wrong_kind", "constructed/exam_wrong_option"):
        row, share = accuracy["per_source"][source], cfg.rm.pair_fractions.get(source, 1.0) / 2
        assert 0.5 < row["train_pairs"] / (19 * share * row["pairs"]) < 2, (source, row, share)
    assert all(0 <= row["base_likelihood"] <= 1 for row in accuracy["per_source"].values())
    table = (cfg.stage_dir("rm") / "accuracy.md").read_text()
    assert "| longer-reply baseline | SFT likelihood baseline |" in table
    assert -1 <= accuracy["score_length_correlation"] <= 1 and 0 <= accuracy["prefers_longer"] <= 1
    assert "Length bias: the score's correlation with the reply's length" in table
    scorer = AutoModelForSequenceClassification.from_pretrained(summary["model"])
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id is not None
    # Exported in the preset's dtype, whichever precision trained them (bf16 where the hardware has it).
    for stage in ("pretrain", "sft", "rm", "judge"):
        assert json.loads((cfg.stage_dir(stage) / "final" / "config.json").read_text())["dtype"] == cfg.model.dtype, stage

    # The evaluation's judge: the other half of the training pairs, measured on the same held-out pairs.
    judge = json.loads((cfg.stage_dir("judge") / "accuracy.json").read_text())
    assert summaries["judge"]["accuracy"] == judge["overall"] and judge["pairs"] == accuracy["pairs"]
    trained_on = [sum(row["train_pairs"] for row in a["per_source"].values()) for a in (accuracy, judge)]
    assert 0.85 < trained_on[1] / trained_on[0] < 1.15, trained_on  # about as many pairs as the reward model
    assert AutoModelForSequenceClassification.from_pretrained(summaries["judge"]["model"]).config.num_labels == 1
    # The SFT model's likelihoods of the held-out replies, computed once (by the reward model) for both: the same
    # baseline, and the kept value of a pair is that pair's own, computed here again.
    assert ({s: r["base_likelihood"] for s, r in judge["per_source"].items()}
            == {s: r["base_likelihood"] for s, r in accuracy["per_source"].items()})
    [kept] = (cfg.data_dir / "pairs").glob("sft_likelihood-*.npy")
    liked, pairs = np.load(kept), reward_model.read_pairs(cfg.data_dir / "pairs")
    pad = load_tokenizer(cfg.model_path).pad_token_id
    held_out = reward_model.padded(pairs.filter(pc.equal(pairs["split"], "test")), pad, cfg.seq.max_len)
    sft = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "final").eval()
    rows = [0, len(liked) // 2, len(liked) - 1]
    with torch.no_grad():
        for column, side in enumerate(("chosen", "rejected")):
            again = reward_model.reply_likelihood(sft, held_out[f"{side}_ids"][rows],
                                                  held_out[f"{side}_reply_len"][rows], pad)
            assert again == pytest.approx(liked[rows, column], abs=1e-4)


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes among this test's descendants (the Cluster's nodes run under it)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # exited meanwhile, or a zombie left by an earlier test's killed job
            pass
    return found


@pytest.mark.chaos
def test_sft_across_two_nodes_survives_a_killed_worker_then_a_lost_node(trained, tmp_path, monkeypatch):
    """Faults in turn on one SFT run across two nodes: a rank dies (the job replaces it and goes on from the
    last checkpoint, optimizer state included), then a node is lost (it goes on with one worker, fewer
    than saved the checkpoint, and finishes)."""
    from ray.cluster_utils import Cluster
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "pretrain"))
    for name, value in cluster_settings().items():  # the node health check cluster.yaml's head runs with
        monkeypatch.setenv(name, value)
    # Three Ray nodes on this machine: the head (driver, Train controller, Ray Data) and two worker nodes
    # that fit one 2.5-CPU training worker each (the head fits none), so the two ranks run on different nodes.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}", f"ray.address={cluster.address}"] + stage_args(
        "sft", 8, checkpoint_every=2, eval_every=2, min_workers=1, num_workers=2, cpus_per_worker=2.5)
    run = load_config(argv)
    path, log = run.stage_dir("sft") / "history.jsonl", tmp_path / "sft.log"
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sft.py"), *argv],
                                    env={**os.environ, "RAY_ADDRESS": ""}, stdout=out, stderr=subprocess.STDOUT)
        # Meanwhile the nodes' metrics endpoints serve the training gauges and Ray Data's queue depths.
        endpoints = [f"{n.node_ip_address}:{n.metrics_export_port}" for n in cluster.list_all_nodes()]
        scraped = {}
        scraper = threading.Thread(target=lambda: scraped.update(scrape_metrics(TRAIN_METRICS, endpoints, 300)))
        scraper.start()
        wait_for_step(path, 3, proc)
        workers = train_workers()
        assert len(workers) == 2, workers
        workers[-1].kill()  # one rank dies mid-run; the job itself keeps going
        killed_after = len(history(run, "sft"))  # the rows before the restart (a step may have ended since the poll)
        wait_for_step(path, 5, proc, after=killed_after)  # replaced, past the step-4 checkpoint
        cluster.remove_node(nodes[1], allow_graceful=False)  # a node lost mid-run, with its training worker
        removed_at = time.time()
        removed_after = len(history(run, "sft"))
        wait_for_step(path, 1, proc, after=removed_after, timeout=600)
        recovery = time.time() - removed_at
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        scraper.join()
    finally:
        if proc:
            proc.kill()
        cluster.shutdown()
    rows = history(run, "sft")
    steps = [r["step"] for r in rows]
    text = log.read_text()
    # Each restart went on right after a checkpoint no more than one interval back, never from the start.
    for after in (killed_after, removed_after):
        resumed_at, last = steps[after], steps[after - 1]
        assert (resumed_at - 1) % 2 == 0 and last - 2 < resumed_at <= last + 1, (after, steps)
    # The replaced rank: same world size, so the optimizer state came back too, and each worker's rows follow from
    # the seed: the steps it redid are the same steps, loss for loss.
    assert f"resumed from step {steps[killed_after] - 1} on 2 worker(s), held-out loss" in text, text[-3000:]
    first_time = {r["step"]: r["loss"] for r in rows[:killed_after]}
    redone = [r for r in rows[killed_after:removed_after] if r["step"] in first_time]
    assert redone and all(r["loss"] == pytest.approx(first_time[r["step"]], rel=1e-5) for r in redone), (rows, killed_after)
    # The lost node: one worker took over with the checkpoint's weights (their held-out loss is the one
    # logged at that step) and a fresh optimizer, the schedule went on where it was, and the run finished.
    resumed_at = steps[removed_after]
    restored = text.split(f"resumed from step {resumed_at - 1} on 1 worker(s) (saved by 2: weights restored, "
                          "optimizer state reset), held-out loss ")[1][:6]
    logged = next(r["eval_loss"] for r in rows if r["step"] == resumed_at - 1)
    assert float(restored) == pytest.approx(logged, abs=1e-3), (restored, logged)
    first_time = {r["step"]: r["lr"] for r in rows[:removed_after]}
    assert all(r["lr"] == pytest.approx(first_time[r["step"]]) for r in rows[removed_after:] if r["step"] in first_time)
    assert steps[-1] == 8 and (run.stage_dir("sft") / "final" / "config.json").exists()
    assert TRAIN_METRICS <= set(scraped), sorted(scraped)
    assert {s.labels["stage"] for s in scraped["ray_clinicalgpt_train_loss"]} == {"sft"}
    assert 1 <= max(s.value for s in scraped["ray_clinicalgpt_train_step"]) <= 8
    assert all(0 < s.value < 20 for s in scraped["ray_clinicalgpt_train_loss"])
    assert all(s.value > 0 for s in scraped["ray_clinicalgpt_train_tokens_per_s"])
    print(f"recovery: {recovery:.1f}s from the node's removal to the next step; resumed at step {resumed_at}")
