"""The clinical evaluation job end to end on the session's tiny models: every family, every output file; killed
midway and resumed, with the answers it saved reused and the results of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from clinicalgpt.config import load_config
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids
from conftest import REPO, isolated_run

pytestmark = pytest.mark.e2e
ITEMS = {"conversation": 12, "exam": 24, "diagnosis": 12, "qa": 8, "safety": 6, "bias": 24}
CHUNK = 8


def eval_args(run_root, cfg, *extra: str) -> list[str]:
    return [f"run_root={run_root}", f"data.root={cfg.data_root}", "eval.models=[pretrain,sft]",
            *(f"eval.items.{k}={v}" for k, v in ITEMS.items()), "eval.max_new_tokens.qa=32",
            "eval.max_new_tokens.safety=32", f"eval.chunk_items={CHUNK}", "eval.bootstrap=200", *extra]


def killed_after(argv: list[str], items_file, lines: int) -> int:
    """jobs/eval.py in its own process on the session's cluster, killed (SIGKILL) once items.jsonl has `lines`
    lines; how many it had then."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "eval.py"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if items_file.exists() and len(items_file.read_text().splitlines()) >= lines:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return len(items_file.read_text().splitlines())


def test_eval_compares_models_on_every_family_killed_midway_resumes_and_writes_the_report(trained, tmp_path, capsys):
    from jobs import eval as evaluation
    cfg, _ = trained
    shared = ("data", "base", "pretrain", "sft", "judge")
    # Killed after its first chunks, then run again: the saved answers are reused, the rest generated.
    resumed_root = isolated_run(cfg, tmp_path / "resumed", shared=shared)
    saved = killed_after(eval_args(resumed_root, cfg), load_config([f"run_root={resumed_root}"]).stage_dir("eval")
                         / "items.jsonl", 3 * CHUNK)
    resumed = evaluation.main(eval_args(resumed_root, cfg))
    total = sum(ITEMS.values())
    assert CHUNK <= resumed["reused"]["pretrain"] <= saved < 2 * total, (saved, resumed["reused"])
    assert f"[eval] pretrain: {resumed['reused']['pretrain']} of " in capsys.readouterr().out

    run_root = isolated_run(cfg, tmp_path, shared=shared)
    results = evaluation.main(eval_args(run_root, cfg))
    out = load_config([f"run_root={run_root}"]).stage_dir("eval")
    assert results["reused"] == {"pretrain": 0, "sft": 0}
    for key in ("families", "health", "items", "dropped"):  # the same results as if never killed
        assert resumed[key] == results[key], key

    fam = results["families"]
    for model in ("pretrain", "sft"):
        conversation = fam["conversation"][model]
        keys = {"bleu1", "bleu2", "bleu3", "bleu4", "gleu", "rouge1", "rouge2", "rougeL"}
        assert set(conversation) == keys | {"ci"} and all(0 <= conversation[k] <= 100 for k in keys)
        assert all(low <= conversation[k] + 1e-9 and conversation[k] <= high + 1e-9
                   for k, (low, high) in conversation["ci"].items())
        exam = fam["exam"][model]
        assert sum(c["items"] for c in exam["per_category"].values()) == results["items"]["exam"]
        assert 0 <= exam["accuracy"] <= 1 and 0 <= exam["likelihood_accuracy"] <= 1
        assert exam["ci"]["accuracy"][0] <= exam["accuracy"] <= exam["ci"]["accuracy"][1]
        assert exam["coverage"] > 0  # some questions name a KG disease
        diagnosis = fam["diagnosis"][model]
        assert sum(g["items"] for g in diagnosis["per_group"].values()) == results["items"]["diagnosis"]
        bias = fam["bias"][model]  # every item scored by likelihood; the generated answers may not parse
        assert bias["likelihood"]["pairs"] == ITEMS["bias"] // 2 and 1 <= bias["likelihood"]["mean"] <= 5
        assert bias["generated"]["parsed"] + bias["generated"]["refusals"] + bias["generated"]["unparsed"] == 1
    for family in ("qa", "safety"):
        rates = fam[family]["sft vs pretrain"]
        assert rates["items"] == results["items"][family] and rates["judge_failed"] == 0
        assert rates["win"] + rates["tie"] + rates["lose"] == pytest.approx(1)
    dropped = sum(n for why in results["dropped"].values() for n in why.values())
    assert sum(results["items"].values()) + dropped == total and results["loaded"] == ITEMS
    for model in ("pretrain", "sft"):  # every family's output health; an exam answer complies when a letter is found
        health = results["health"][model]
        assert set(health) == set(results["items"]) and all(0 <= v <= 1 for h in health.values() for v in h.values())
        assert health["exam"]["compliant"] == pytest.approx(1 - fam["exam"][model]["no_answer"])
        assert health["bias"]["compliant"] == pytest.approx(fam["bias"][model]["generated"]["parsed"])
        assert "compliant" in health["diagnosis"] and "compliant" not in health["qa"]

    lines = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * sum(results["items"].values())
    exam_line = next(x for x in lines if x["family"] == "exam" and x["candidate"] == "sft")
    assert "correct" in exam_line["scores"] and len(exam_line["choice_logprobs"]) >= 4  # a mean log-prob per option
    assert all(lp < 0 for lp in exam_line["choice_logprobs"].values())
    resumed_lines = (load_config([f"run_root={resumed_root}"]).stage_dir("eval") / "items.jsonl").read_text()
    assert [x["answer"] for x in map(json.loads, resumed_lines.splitlines())] == [x["answer"] for x in lines]
    report = (out / "report.md").read_text()
    for title in ("Medical conversation", "Medical exam", "Diagnosis", "Medical QA, judged", "Safety, judged",
                  "Bias toward patients", "Output health"):
        assert title in report
    for chart in ("conversation", "exam", "diagnosis", "qa", "safety", "bias", "health"):
        assert (out / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The SFT model answered on the pretrained model's engine with its own weights loaded in place: its
    # answers are its own greedy decoding (transformers, fp32). (The session's 2-step SFT model may still
    # answer like the pretrained one.)
    assert "sft: weights loaded into the running engine" in capsys.readouterr().out
    sft = results["paths"][1]
    tok, model = load_tokenizer(sft, cfg.model.chat_template), AutoModelForCausalLM.from_pretrained(sft)
    for line in [x for x in lines if x["family"] == "diagnosis" and x["candidate"] == "sft"][:4]:
        ids = torch.tensor([prompt_ids(tok, line["prompt"])])
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True) == line["answer"]


def test_eval_says_what_to_run_first_and_refuses_unknown_families(trained, tmp_path):
    from jobs import eval as evaluation
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "pretrain", "sft"))
    with pytest.raises(SystemExit, match=r"no ppo model .* run python jobs/ppo.py"):
        evaluation.main(eval_args(run_root, cfg, "eval.models=[sft,ppo]"))
    with pytest.raises(SystemExit, match=r"no judge model .* run python jobs/judge.py"):  # before any model answers
        evaluation.main(eval_args(run_root, cfg, "eval.models=[pretrain,sft]"))
    with pytest.raises(SystemExit, match=r"eval.judge=openai needs eval.judge_endpoint, .* defined: none"):
        evaluation.main(eval_args(run_root, cfg, "eval.judge=openai"))
    with pytest.raises(SystemExit, match="unknown 'radiology'"):
        evaluation.main(eval_args(run_root, cfg, "eval.models=[sft]", "eval.families=[radiology]"))
