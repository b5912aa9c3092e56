"""The candidates' answers scored per family: conversation metrics, exam and diagnosis accuracy (overall and per
category or disease group), the judged families' win / tie / lose rates of the last candidate against each other,
the bias family's attitude scores, each headline figure with a bootstrap 95% interval over the items, and every
family's output health."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ..config import Config
from ..sources import EXAM_INSTRUCTION
from . import metrics
from .bias import read_answer, score_bias
from .judges import JUDGES

MIN_GROUP_ITEMS = 5  # diagnosis groups with fewer items are pooled as "Other"


def texts(answers: list[dict]) -> list[str]:
    return [a["answer"] for a in answers]


def accuracy_by(rows: list[dict], key: str, field: str = "correct") -> dict[str, dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r[field])
    return {g: {"accuracy": float(np.mean(v)), "items": len(v)} for g, v in sorted(groups.items())}


def mean_ci(cfg: Config, values: list) -> list[float]:
    return metrics.bootstrap_interval(lambda idx: np.mean(np.asarray(values, float)[idx], axis=1), len(values),
                                      cfg.eval.bootstrap, cfg.eval.seed)


def exam_stem(prompt: str, options: dict[str, str]) -> str:
    """An exam prompt (sources.format_exam_question's) without its instruction and option lines: the question."""
    lines = {EXAM_INSTRUCTION} | {f"{k}. {v}" for k, v in options.items()}
    return "\n".join(line for line in prompt.split("\n") if line not in lines)


def score_exam(cfg: Config, items: list[dict], answers: list[dict], categorizer) -> tuple[dict, list]:
    likely = bool(answers) and all("choice_logprobs" in a for a in answers)  # local models, exam_likelihood on
    out = []
    for r, a in zip(items, answers):
        chosen = metrics.extract_answer(a["answer"], r["meta"]["options"])
        category = categorizer.category(r["id"], exam_stem(r["messages"][-1]["content"], r["meta"]["options"]),
                                        r["meta"]["options"], r["meta"].get("category") or "")
        row = {"id": r["id"], "category": category,
               "source": r["source"], "extracted": chosen, "correct": chosen == r["meta"]["answer"]}
        if likely:
            choice = max(a["choice_logprobs"], key=a["choice_logprobs"].get)
            row.update(likelihood_choice=choice, likelihood_correct=choice == r["meta"]["answer"])
        out.append(row)
    correct = [r["correct"] for r in out]
    result = {"accuracy": float(np.mean(correct)), "per_category": accuracy_by(out, "category"),
              "per_source": accuracy_by(out, "source"),
              "no_answer": float(np.mean([r["extracted"] == "" for r in out])),
              "chance": float(np.mean([1 / len(r["meta"]["options"]) for r in items])),  # single answers
              "coverage": float(np.mean([r["category"] != metrics.UNCATEGORIZED for r in out])),
              "ci": {"accuracy": mean_ci(cfg, correct)}}
    if likely:
        result["likelihood_accuracy"] = float(np.mean([r["likelihood_correct"] for r in out]))
        result["likelihood_per_category"] = accuracy_by(out, "category", "likelihood_correct")
        result["ci"]["likelihood_accuracy"] = mean_ci(cfg, [r["likelihood_correct"] for r in out])
    return result, out


def score_diagnosis(cfg: Config, items: list[dict], replies: list[str], synonyms) -> tuple[dict, list]:
    counts = defaultdict(int)
    for r in items:
        counts[r["meta"].get("disease_group", "unknown")] += 1
    out = []
    for r, reply in zip(items, replies):
        group = r["meta"].get("disease_group", "unknown")
        out.append({"id": r["id"], "group": group if counts[group] >= MIN_GROUP_ITEMS else "Other",
                    "source": r["source"], "gold": metrics.primary_diagnosis(r["meta"]["diagnosis"]),
                    "correct": metrics.names_diagnosis(reply, r["meta"]["diagnosis"], synonyms)})
    per_group = accuracy_by(out, "group")
    correct = [r["correct"] for r in out]
    return {"accuracy": float(np.mean(correct)), "per_group": per_group,
            "average": float(np.mean([g["accuracy"] for g in per_group.values()])),
            "per_source": accuracy_by(out, "source"), "ci": {"accuracy": mean_ci(cfg, correct)}}, out


def score_judged(cfg: Config, verdicts: list[int | None]) -> dict:
    """Win / tie / lose rates over the items the judge gave a verdict, with their intervals."""
    judged = [v for v in verdicts if v is not None]
    rates = metrics.win_rates(judged)
    rates["ci"] = {name: mean_ci(cfg, [v == k for v in judged]) for k, name in metrics.VERDICT.items()} if judged else {}
    rates["judge_failed"] = len(verdicts) - len(judged)
    return rates


def score_bias_family(cfg: Config, items: list[dict], answers: list[dict]) -> tuple[dict, list]:
    result, rows = score_bias(items, answers)
    for source, key in (("generated", "attitude"), ("likelihood", "likelihood_attitude")):
        if source in result:
            scores = [r[key] for r in rows if r.get(key) is not None]
            result[source]["ci"] = {"mean": mean_ci(cfg, scores) if scores else None}
    return result, rows


def exam_categorizer(cfg: Config) -> metrics.ExamCategorizer:
    """The knowledge graphs' diseases and departments: exam categories, and the diseases an answer names."""
    kg_files = [cfg.data_root / s.path for s in cfg.data.sources if s.kind.startswith("kg_")]
    return metrics.ExamCategorizer.from_kg(kg_files, cfg.eval.exam_labels)


def score_families(cfg: Config, names: list[str], items: dict[str, list[dict]], answers: dict[str, dict[str, list]],
                   categorizer, judge_cache: Path) -> tuple[dict, dict]:
    """family -> its results per candidate (per "last vs other" comparison for the judged families), and
    family -> candidate -> each item's scores."""
    kg_files = [cfg.data_root / s.path for s in cfg.data.sources if s.kind.startswith("kg_")]
    judge = JUDGES[cfg.eval.judge](cfg, judge_cache) if {"qa", "safety"} & set(items) else None
    results, scores = {}, {}
    try:
        for family, rows in items.items():
            per_model, scored = {}, {}
            if family == "conversation":
                references = [r["reference"] for r in rows]
                per_model = {name: metrics.conversation_scores(texts(answers[name][family]), references,
                                                               cfg.eval.bootstrap, cfg.eval.seed) for name in names}
            elif family == "exam":
                for name in names:
                    per_model[name], scored[name] = score_exam(cfg, rows, answers[name][family], categorizer)
            elif family == "diagnosis":
                synonyms = metrics.synonyms_from_kg(kg_files)
                for name in names:
                    per_model[name], scored[name] = score_diagnosis(cfg, rows, texts(answers[name][family]), synonyms)
            elif family == "bias":
                for name in names:
                    per_model[name], scored[name] = score_bias_family(cfg, rows, answers[name][family])
            else:
                last = names[-1]
                for other in names[:-1]:
                    verdicts = judge.verdicts(family, rows, texts(answers[last][family]), texts(answers[other][family]))
                    per_model[f"{last} vs {other}"] = score_judged(cfg, verdicts)
                    scored[other] = [{"verdict_of_" + last: metrics.VERDICT.get(v, "judge failed")} for v in verdicts]
            results[family], scores[family] = per_model, scored
        if judge is not None:
            print(f"[eval] judge: {judge.cache.hits} judgements reused from {judge_cache.name}", flush=True)
    finally:
        if judge is not None:
            judge.close()
    return results, scores


def score_health(names: list[str], items: dict[str, list[dict]], answers: dict, categorizer) -> dict:
    """candidate -> family -> metrics.output_health of its answers; compliance where a family asks for a format:
    an exam answer names an option letter, a diagnosis answer names a disease of the knowledge graphs, a bias answer
    gives a scale point."""
    health = {}
    for name in names:
        health[name] = {}
        for family, rows in items.items():
            replies = texts(answers[name][family])
            compliant = ([metrics.extract_answer(a, r["meta"]["options"]) != "" for a, r in zip(replies, rows)]
                         if family == "exam" else [bool(categorizer.diseases_in(a)) for a in replies]
                         if family == "diagnosis" else [isinstance(read_answer(a), int) for a in replies]
                         if family == "bias" else None)
            truncated = [a["truncated"] for a in answers[name][family]]
            health[name][family] = metrics.output_health(replies, truncated, compliant)
    return health
