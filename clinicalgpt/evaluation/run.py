"""The evaluation run: load the items, let every candidate answer them (reusing the answers a killed run saved),
score, and write the outputs."""

from __future__ import annotations

import json
import time

from actors.rollout import RolloutEngines

from ..config import Config
from ..tokenizer import load_tokenizer
from .items import ENDPOINT_CANNOT, AnswerStore, Candidate, answer, drop_long, load_items
from .report import draw_charts, markdown_report
from .scoring import exam_categorizer, score_families, score_health


def drop_failed(items: dict[str, list[dict]], answers: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, int]]:
    """Items an endpoint failed after its retries are dropped for every candidate (all answer the same items);
    the counts per family and candidate are returned."""
    dropped = {}
    for family, rows in items.items():
        failed = {name: {i for i, a in enumerate(per[family]) if "error" in a} for name, per in answers.items()}
        gone = set().union(*failed.values())
        dropped[family] = {f"endpoint error ({name})": len(f) for name, f in failed.items() if f}
        items[family] = [r for i, r in enumerate(rows) if i not in gone]
        for per in answers.values():
            per[family] = [a for i, a in enumerate(per[family]) if i not in gone]
    return dropped


def evaluate(cfg: Config, candidates: list[Candidate]) -> dict:
    """The candidates side by side on every family. Writes items.jsonl (a line per candidate and item: its answer,
    and after scoring the item's prompt, reference and scores), results.json, report.md and the charts under the
    eval stage folder; prints the report and returns the results."""
    names, out = [c.name for c in candidates], cfg.stage_dir("eval")
    started = time.time()
    items = load_items(cfg)
    loaded = {family: len(rows) for family, rows in items.items()}
    too_long = drop_long(cfg, items, [load_tokenizer(c.path, cfg.model.chat_template)
                                      for c in candidates if not c.endpoint])
    print(f"[eval] {len(names)} candidates x {', '.join(f'{f} {len(r)}' for f, r in items.items())} items "
          f"(too long, dropped: {too_long})", flush=True)
    store = AnswerStore(out / "items.jsonl")
    if store.torn:
        print(f"[eval] {store.torn} torn line(s) in items.jsonl skipped: their chunks are answered again", flush=True)
    # Local models of the same architecture share the engines, each loading its weights in place.
    engines = RolloutEngines(cfg.eval.rollout, cfg.eval.engine, "eval", cfg.seq.max_len, cfg.eval.seed, cfg.model.dtype)
    answers, reused = {}, {}
    try:
        for c in candidates:
            answers[c.name], reused[c.name] = answer(cfg, c, items, store, lambda c=c: engines.load(c.name, c.path))
    finally:
        engines.close()
        store.close()
    failed = drop_failed(items, answers)

    categorizer = exam_categorizer(cfg) if {"exam", "diagnosis"} & set(items) else None  # reads the KGs
    families, scores = score_families(cfg, names, items, answers, categorizer, out / "judge_cache.jsonl")
    results = {"models": names, "paths": [c.endpoint.url if c.endpoint else c.path for c in candidates],
               "endpoints": {c.name: ENDPOINT_CANNOT for c in candidates if c.endpoint},
               "items": {f: len(r) for f, r in items.items()},
               "dropped": {f: {**({"too long": too_long[f]} if too_long[f] else {}), **failed[f]} for f in items},
               "loaded": loaded, "reused": reused, "families": families,
               "health": score_health(names, items, answers, categorizer), "seconds": round(time.time() - started, 1)}
    lines = []
    for family, rows in items.items():
        for i, r in enumerate(rows):
            for name in names:
                lines.append({**answers[name][family][i], "candidate": name, "prompt": r["messages"], "reference": r["reference"],
                              "scores": scores[family][name][i] if name in scores[family] else {}})
    # The answers again, now with their items and scores: what a later run reuses, and what people read.
    (out / "items.jsonl.partial").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    (out / "items.jsonl.partial").replace(out / "items.jsonl")
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2))
    report = markdown_report(results)
    (out / "report.md").write_text(report)
    draw_charts(results, out)
    print(report)
    return results
