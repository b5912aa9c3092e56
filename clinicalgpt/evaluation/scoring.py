"""The models' answers scored per family: conversation metrics, exam and diagnosis accuracy (overall and per
category or disease group), the judged families' win / tie / lose rates of the last model against each other, and
every family's output health."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..config import Config
from . import metrics
from .judges import JUDGES

MIN_GROUP_ITEMS = 5  # diagnosis groups with fewer items are pooled as "Other"


def accuracy_by(rows: list[dict], key: str, field: str = "correct") -> dict[str, dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r[field])
    return {g: {"accuracy": float(np.mean(v)), "items": len(v)} for g, v in sorted(groups.items())}


def score_exam(items: list[dict], answers: dict[str, list[str]], categorizer) -> tuple[dict, list]:
    likely = answers.get("exam_likelihood")
    out = []
    for i, (r, reply) in enumerate(zip(items, answers["exam"])):
        chosen = metrics.extract_answer(reply, r["meta"]["options"])
        row = {"id": r["id"], "category": categorizer.category(r["id"], r["messages"][-1]["content"]),
               "source": r["source"], "extracted": chosen, "correct": chosen == r["meta"]["answer"]}
        if likely:
            row.update(likelihood_choice=likely[i], likelihood_correct=likely[i] == r["meta"]["answer"])
        out.append(row)
    result = {"accuracy": float(np.mean([r["correct"] for r in out])), "per_category": accuracy_by(out, "category"),
              "per_source": accuracy_by(out, "source"),
              "no_answer": float(np.mean([r["extracted"] == "" for r in out])),
              "chance": float(np.mean([1 / len(r["meta"]["options"]) for r in items])),  # single answers
              "coverage": float(np.mean([r["category"] != metrics.UNCATEGORIZED for r in out]))}
    if likely:
        result["likelihood_accuracy"] = float(np.mean([r["likelihood_correct"] for r in out]))
        result["likelihood_per_category"] = accuracy_by(out, "category", "likelihood_correct")
    return result, out


def score_diagnosis(items: list[dict], replies: list[str], synonyms) -> tuple[dict, list]:
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
    return {"accuracy": float(np.mean([r["correct"] for r in out])), "per_group": per_group,
            "average": float(np.mean([g["accuracy"] for g in per_group.values()])),
            "per_source": accuracy_by(out, "source")}, out


def exam_categorizer(cfg: Config) -> metrics.ExamCategorizer:
    """The knowledge graphs' diseases and departments: exam categories, and the diseases an answer names."""
    kg_files = [cfg.data_root / s.path for s in cfg.data.sources if s.kind.startswith("kg_")]
    return metrics.ExamCategorizer.from_kg(kg_files, cfg.eval.exam_labels)


def score_families(cfg: Config, names: list[str], items: dict[str, list[dict]],
                   answers: dict[str, dict[str, list[str]]], categorizer) -> tuple[dict, dict]:
    """family -> its results per model (per "last vs other" comparison for the judged families), and
    family -> model -> each item's scores."""
    kg_files = [cfg.data_root / s.path for s in cfg.data.sources if s.kind.startswith("kg_")]
    judge = JUDGES[cfg.eval.judge](cfg) if {"qa", "safety"} & set(items) else None
    results, scores = {}, {}
    for family, rows in items.items():
        per_model, scored = {}, {}
        if family == "conversation":
            references = [r["reference"] for r in rows]
            per_model = {name: metrics.conversation_scores(answers[name][family], references) for name in names}
        elif family == "exam":
            for name in names:
                per_model[name], scored[name] = score_exam(rows, answers[name], categorizer)
        elif family == "diagnosis":
            synonyms = metrics.synonyms_from_kg(kg_files)
            for name in names:
                per_model[name], scored[name] = score_diagnosis(rows, answers[name][family], synonyms)
        else:
            last = names[-1]
            for other in names[:-1]:
                verdicts = judge.verdicts(family, rows, answers[last][family], answers[other][family])
                per_model[f"{last} vs {other}"] = metrics.win_rates(verdicts)
                scored[other] = [{"verdict_of_" + last: metrics.VERDICT[v]} for v in verdicts]
        results[family], scores[family] = per_model, scored
    if judge is not None:
        judge.close()
    return results, scores


def score_health(names: list[str], items: dict[str, list[dict]], answers: dict, categorizer) -> dict:
    """model -> family -> metrics.output_health of its answers; compliance where a family asks for a format:
    an exam answer names an option letter, a diagnosis answer names a disease of the knowledge graphs."""
    health = {}
    for name in names:
        health[name] = {}
        for family, rows in items.items():
            replies = answers[name][family]
            compliant = ([metrics.extract_answer(a, r["meta"]["options"]) != "" for a, r in zip(replies, rows)]
                         if family == "exam" else [bool(categorizer.diseases_in(a)) for a in replies]
                         if family == "diagnosis" else None)
            health[name][family] = metrics.output_health(replies, answers[name]["truncated"][family], compliant)
    return health
