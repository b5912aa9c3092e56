"""The clinical evaluation job end to end on the session's tiny models: every family, every output file."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from clinicalgpt.config import load_config
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids
from conftest import isolated_run

pytestmark = pytest.mark.e2e
ITEMS = {"conversation": 12, "exam": 24, "diagnosis": 12, "qa": 8, "safety": 6}


def eval_args(run_root, cfg, *extra: str) -> list[str]:
    return [f"run_root={run_root}", f"data.root={cfg.data_root}", "eval.models=[pretrain,sft]",
            *(f"eval.items.{k}={v}" for k, v in ITEMS.items()), "eval.max_new_tokens.qa=32",
            "eval.max_new_tokens.safety=32", *extra]


def test_eval_compares_models_on_every_family_and_writes_the_report(trained, tmp_path, capsys):
    from jobs import eval as evaluation
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "pretrain", "sft", "judge"))
    results = evaluation.main(eval_args(run_root, cfg))
    out = load_config([f"run_root={run_root}"]).stage_dir("eval")

    fam = results["families"]
    for model in ("pretrain", "sft"):
        conversation = fam["conversation"][model]
        assert set(conversation) == {"bleu1", "bleu2", "bleu3", "bleu4", "gleu", "rouge1", "rouge2", "rougeL"}
        assert all(0 <= v <= 100 for v in conversation.values())
        exam = fam["exam"][model]
        assert sum(c["items"] for c in exam["per_category"].values()) == results["items"]["exam"]
        assert 0 <= exam["accuracy"] <= 1 and 0 <= exam["likelihood_accuracy"] <= 1
        assert exam["coverage"] > 0  # some questions name a KG disease
        diagnosis = fam["diagnosis"][model]
        assert sum(g["items"] for g in diagnosis["per_group"].values()) == results["items"]["diagnosis"]
    for family in ("qa", "safety"):
        rates = fam[family]["sft vs pretrain"]
        assert rates["items"] == results["items"][family]
        assert rates["win"] + rates["tie"] + rates["lose"] == pytest.approx(1)
    assert sum(results["items"].values()) + sum(results["skipped_long"].values()) == sum(ITEMS.values())
    for model in ("pretrain", "sft"):  # every family's output health; an exam answer complies when a letter is found
        health = results["health"][model]
        assert set(health) == set(results["items"]) and all(0 <= v <= 1 for h in health.values() for v in h.values())
        assert health["exam"]["compliant"] == pytest.approx(1 - fam["exam"][model]["no_answer"])
        assert "compliant" in health["diagnosis"] and "compliant" not in health["qa"]

    items = json.loads((out / "items.json").read_text())
    assert len(items) == sum(results["items"].values())
    exam_item = next(i for i in items if i["family"] == "exam")
    assert set(exam_item["outputs"]) == {"pretrain", "sft"} and "correct" in exam_item["scores"]["sft"]
    report = (out / "report.md").read_text()
    for title in ("Medical conversation", "Medical exam", "Diagnosis", "Medical QA, judged", "Safety, judged",
                  "Output health"):
        assert title in report
    for chart in ("conversation", "exam", "diagnosis", "qa", "safety", "health"):
        assert (out / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The SFT model answered on the pretrained model's engine with its own weights loaded in place: its
    # answers are its own greedy decoding (transformers, fp32). (The session's 2-step SFT model may still
    # answer like the pretrained one.)
    assert "sft: weights loaded into the running engine" in capsys.readouterr().out
    sft = results["paths"][1]
    tok, model = load_tokenizer(sft, cfg.model.chat_template), AutoModelForCausalLM.from_pretrained(sft)
    for item in [i for i in items if i["family"] == "diagnosis"][:4]:
        ids = torch.tensor([prompt_ids(tok, item["prompt"])])
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True) == item["outputs"]["sft"]


def test_eval_says_what_to_run_first_and_refuses_unknown_families(trained, tmp_path):
    from jobs import eval as evaluation
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "pretrain", "sft"))
    with pytest.raises(SystemExit, match=r"no ppo model .* run python jobs/ppo.py"):
        evaluation.main(eval_args(run_root, cfg, "eval.models=[sft,ppo]"))
    with pytest.raises(SystemExit, match=r"no judge model .* run python jobs/judge.py"):  # before any model answers
        evaluation.main(eval_args(run_root, cfg, "eval.models=[pretrain,sft]"))
    with pytest.raises(SystemExit, match="unknown 'radiology'"):
        evaluation.main(eval_args(run_root, cfg, "eval.models=[sft]", "eval.families=[radiology]"))
