"""End to end on the real corpora: the data job builds every set, no evaluation item leaks into training,
the packed training streams feed torch batches and are packed once, and the bootstrapped tiny model
loads in transformers and vLLM."""

import json

import pyarrow.parquet as pq
import pytest

from clinicalgpt.config import load_config
from clinicalgpt.corpus import read_records
from clinicalgpt.packing import IGNORE, first_rows, packed_stream, read_stream, stream_summary
from clinicalgpt.records import leak_key
from clinicalgpt.stages import CORPUS_TASKS
from conftest import isolated_run

pytestmark = pytest.mark.e2e


def test_every_corpus_becomes_records(built):
    cfg, manifest = built
    by_task = manifest["totals"]["by_task"]
    assert by_task["kg_qa"] >= 100_000  # the paper's cMedQA-KG had 100k+ pairs
    for task in ("community_qa", "exam", "dialogue", "diagnosis", "preference", "safety"):
        assert by_task[task] > 100, task
    for spec in cfg.data.sources:  # every configured file contributed
        assert manifest["totals"]["by_source"].get(spec.path.removesuffix(".jsonl"), 0) > 0, spec.path
    assert manifest["records"]["test"]["exam"]["exam_mcq/medqa_mcmle_test"] > 3000
    assert manifest["records"]["rl"]["community_qa"]["community_qa/huatuo26m_test_extra"] > 3000
    # English and Chinese KG templates, forward and inverse questions
    kg = pq.read_table(cfg.data_dir / "records" / "train" / "kg_qa", columns=["meta"]).column("meta").to_pylist()
    metas = [json.loads(m) for m in kg[::50]]
    assert {m["lang"] for m in metas} == {"zh", "en"}
    assert any(m["relation"].startswith("inverse:") for m in metas)


def test_manifest_reports_counts_tokens_and_skips(built):
    cfg, manifest = built
    on_disk = json.loads((cfg.data_dir / "manifest.json").read_text())
    assert on_disk["totals"] == manifest["totals"]
    assert "## Skipped input lines" in (cfg.data_dir / "manifest.md").read_text()
    skipped_lines = sum(1 for _ in open(cfg.data_dir / "skipped.jsonl"))
    assert skipped_lines == manifest["skipped_total"] > 0  # e.g. KG rows whose objects are all truncated
    train_tokens = manifest["tokens"]["train"]
    assert train_tokens["kg_qa"]["tokens"] > train_tokens["kg_qa"]["trained_tokens"] > 0
    assert all(s["packing_efficiency"] > 0.9 for s in manifest["streams"].values()), manifest["streams"]
    assert "## Packed streams" in (cfg.data_dir / "manifest.md").read_text()
    # The reward model's pairs, built once here for it and the judge: every kind, held out and for training.
    pairs = manifest["pairs"]["pairs"]
    kinds = {"constructed/kg_swap", "constructed/kg_wrong_kind", "constructed/exam_wrong_option", "pulse_eval/WebMedQA"}
    assert kinds <= set(pairs["test"]) and kinds <= set(pairs["train"]), pairs
    assert sum(pairs["train"].values()) > sum(pairs["test"].values()) > 500
    assert "## Reward-model pairs" in (cfg.data_dir / "manifest.md").read_text()
    # The session's whole process tree (pytest, the session's cluster and the job's workers): 3.72-4.05 GB at the same
    # data code on 2026-12-05 (3.75 GB run alone as a user runs it, with its own cluster); 2.8-3.2 when the bound of
    # 4.0 was set, before the token counts and the reward-model pairs joined the job.
    assert manifest["peak_memory_gb"] < 4.5


def test_no_evaluation_item_appears_in_any_training_set(built):
    cfg, _ = built
    keys = {}
    for split in ("train", "valid", "rl", "test"):
        table = pq.read_table(cfg.data_dir / "records" / split, columns=["messages"])
        keys[split] = {leak_key({"messages": m}) for m in table.column("messages").to_pylist()}
    assert len(keys["test"]) > 10_000
    for split in ("train", "valid", "rl"):
        assert not keys[split] & keys["test"], split


def test_packed_streams_feed_torch_batches_and_are_packed_once(built, tmp_path):
    cfg, manifest = built
    assert read_records(cfg, ["valid"]).count() == manifest["totals"]["by_split"]["valid"]
    streams = manifest["streams"]
    assert set(streams) == {"pretrain_train", "pretrain_eval", "sft_train", "sft_eval"}
    for name in ("pretrain_train", "sft_train"):
        assert streams[name]["rows"] > 1000 and streams[name]["packing_efficiency"] > 0.9, (name, streams[name])
    # SFT trains on a tenth of the KG QA records (sft.task_fractions): fewer samples than all SFT records.
    all_sft = sum(manifest["tokens"]["train"][task]["records"] for task in CORPUS_TASKS)
    assert streams["sft_train"]["samples"] < 0.7 * all_sft
    sft = next(iter(read_stream(cfg.data_dir / "packed" / "sft_train").iter_torch_batches(batch_size=4)))
    assert sft["input_ids"].shape == (4, cfg.seq.max_len)
    assert sft["position_ids"][:, 0].eq(0).all() and (sft["labels"] != IGNORE).any()
    assert (sft["labels"] != IGNORE).sum() < sft["num_tokens"].sum()  # the prompts are not trained
    text = first_rows(cfg.data_dir / "packed" / "pretrain_eval", 4)
    real = text["labels"] != IGNORE  # pretraining trains every token but the padding
    assert (text["labels"][real] == text["input_ids"][real]).all() and real.sum() == text["num_tokens"].sum()

    # A stream is packed once and reused; a change in what shapes it packs it again.
    spec = {"mode": "chat", "splits": ["valid"], "tasks": ["diagnosis"]}
    folder = packed_stream(cfg, "test_diagnosis", spec)
    written = (folder / "stream.json").stat().st_mtime_ns
    assert packed_stream(cfg, "test_diagnosis", spec) == folder and (folder / "stream.json").stat().st_mtime_ns == written
    linked = load_config([f"run_root={isolated_run(cfg, tmp_path)}"])  # a run reaching the data through a link
    packed_stream(linked, "test_diagnosis", spec)
    assert (folder / "stream.json").stat().st_mtime_ns == written
    rows = stream_summary(folder)["rows"]
    packed_stream(cfg, "test_diagnosis", {**spec, "tasks": ["diagnosis", "community_qa"]})
    assert stream_summary(folder)["rows"] > rows


def test_bootstrapped_model_loads_offline_and_generates_in_vllm(built):
    from jobs import bootstrap
    cfg, _ = built
    result = bootstrap.main([f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}"])
    assert 1e6 < result["parameters"] < 2e7  # a few million parameters
    assert len(result["transformers_ids"]) > 0 and len(result["vllm_ids"]) > 0
    # Greedy decoding of the same fp32 weights: vLLM and transformers pick the same first tokens.
    assert result["vllm_ids"][:8] == result["transformers_ids"][:8]


def test_a_data_file_of_evaluation_sources_alone_builds_with_a_models_tokenizer(built, tmp_path):
    """A team evaluating trained models on its own exam bank: only test sources and a model's own tokenizer. The job
    writes the records and their token counts, and no training streams or pairs (it once crashed after the records)."""
    from jobs import data
    cfg, _ = built
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "exams.csv").write_text("题目,A,B,C,答案\n" + "".join(
        f"第{i}题：高血压的诊断标准是,收缩压≥140,收缩压≥120,收缩压≥160,A\n" for i in range(3)))
    config = tmp_path / "bank.yaml"
    config.write_text("data:\n  sources:\n    - {path: bank/exams.csv, kind: exam, split: test, "
                      "fields: {question: 题目, answer: 答案}}\n")
    manifest = data.main([f"config={config}", f"data.root={tmp_path}", f"run_root={tmp_path / 'runs'}",
                          f"model.path={cfg.model_path}", "model.train_tokenizer=false"])
    assert manifest["records"] == {"test": {"exam": {"bank/exams": 3}}}
    assert manifest["tokens"]["test"]["exam"]["records"] == 3
    assert manifest["streams"] == {} and manifest["pairs"] is None
    assert "| exam | 0 | 0 | 0 | 3 |" in (tmp_path / "runs" / "tiny" / "data" / "manifest.md").read_text()
