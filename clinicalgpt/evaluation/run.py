"""The evaluation run: load the items, let every model answer them, score, and write the outputs."""

from __future__ import annotations

import json
import time

from actors.rollout import RolloutEngines

from ..config import Config
from ..tokenizer import load_tokenizer
from .items import answer_all, drop_long, load_items
from .report import draw_charts, markdown_report
from .scoring import exam_categorizer, score_families, score_health


def evaluate(cfg: Config, paths: list[str]) -> dict:
    """cfg.eval.models (their folders: `paths`) side by side on every family. Writes items.json (every item's
    prompt, outputs, reference and scores), results.json, report.md and the charts under the eval stage folder;
    prints the report and returns the results."""
    names, out = list(cfg.eval.models), cfg.stage_dir("eval")
    started = time.time()
    items = load_items(cfg)
    skipped = drop_long(cfg, items, [load_tokenizer(p, cfg.model.chat_template) for p in paths])
    print(f"[eval] {len(names)} models x {', '.join(f'{f} {len(r)}' for f, r in items.items())} items "
          f"(too long, dropped: {skipped})", flush=True)
    # Models of the same architecture share the engines, each loading its weights in place.
    engines = RolloutEngines(cfg.eval.rollout, cfg.eval.engine, "eval", cfg.seq.max_len, cfg.eval.seed, cfg.model.dtype)
    answers = {}
    try:
        for name, path in zip(names, paths):
            answers[name] = answer_all(cfg, name, path, engines.load(name, path), items)
    finally:
        engines.close()

    categorizer = exam_categorizer(cfg) if {"exam", "diagnosis"} & set(items) else None  # reads the KGs
    families, scores = score_families(cfg, names, items, answers, categorizer)
    results = {"models": names, "paths": paths, "items": {f: len(r) for f, r in items.items()},
               "skipped_long": skipped, "families": families, "health": score_health(names, items, answers, categorizer),
               "seconds": round(time.time() - started, 1)}
    records = []
    for family, rows in items.items():
        for i, r in enumerate(rows):
            records.append({"family": family, "id": r["id"], "source": r["source"], "prompt": r["messages"],
                            "reference": r["reference"], "outputs": {name: answers[name][family][i] for name in names},
                            "scores": {name: scored[i] for name, scored in scores[family].items()}})

    out.mkdir(parents=True, exist_ok=True)
    (out / "items.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2))
    report = markdown_report(results)
    (out / "report.md").write_text(report)
    draw_charts(results, out)
    print(report)
    return results
