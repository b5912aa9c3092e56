"""End to end on the real corpora: the data job builds every set, no evaluation item leaks into training,
the packed SFT stream feeds torch batches, and the bootstrapped tiny model loads in transformers and vLLM."""

import json

import pyarrow.parquet as pq
import pytest

from clinicalgpt.corpus import read_records
from clinicalgpt.packing import IGNORE, packed_dataset
from clinicalgpt.records import leak_key

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
    assert manifest["packing"]["packing_efficiency"] > 0.9
    assert manifest["peak_memory_gb"] < 4.0


def test_no_evaluation_item_appears_in_any_training_set(built):
    cfg, _ = built
    keys = {}
    for split in ("train", "valid", "rl", "test"):
        table = pq.read_table(cfg.data_dir / "records" / split, columns=["messages"])
        keys[split] = {leak_key({"messages": m}) for m in table.column("messages").to_pylist()}
    assert len(keys["test"]) > 10_000
    for split in ("train", "valid", "rl"):
        assert not keys[split] & keys["test"], split


def test_packed_sft_stream_feeds_torch_batches(built):
    cfg, manifest = built
    assert read_records(cfg, ["valid"]).count() == manifest["totals"]["by_split"]["valid"]
    ds = packed_dataset(cfg, ["valid"], ["community_qa", "dialogue"])
    batch = next(iter(ds.iter_torch_batches(batch_size=4, drop_last=True)))
    assert batch["input_ids"].shape == (4, cfg.seq.max_len)
    assert batch["position_ids"][:, 0].eq(0).all() and (batch["labels"] != IGNORE).any()


def test_bootstrapped_model_loads_offline_and_generates_in_vllm(built):
    from jobs import bootstrap
    cfg, _ = built
    result = bootstrap.main([f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}"])
    assert 1e6 < result["parameters"] < 2e7  # a few million parameters
    assert len(result["transformers_ids"]) > 0 and len(result["vllm_ids"]) > 0
    # Greedy decoding of the same fp32 weights: vLLM and transformers pick the same first tokens.
    assert result["vllm_ids"][:8] == result["transformers_ids"][:8]
