"""Stage 1: build the clinical training and evaluation sets from the corpora under the data root.

    python jobs/data.py [preset=tiny] [data.root=/path/to/corpora] [key=value ...]

Writes runs/<preset>/data/: records/<split>/<task>/*.parquet, skipped.jsonl (every skipped input line
with its reason), packed/<stream>/ (the tokenized, packed Parquet streams that pretrain and SFT read),
manifest.json and manifest.md (counts per source, task and split; token counts; packing; skip reasons;
wall time and peak memory). Presets that train their own tokenizer (tiny) train it here on the
training records, into the model folder that jobs/bootstrap.py completes.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from clinicalgpt.config import Config, load_config
from clinicalgpt.corpus import build_records, read_records
from clinicalgpt.packing import IGNORE, packed_stream, stream_summary, tokenize_chats
from clinicalgpt.runtime import PeakMemory, init_ray
from clinicalgpt.stages import STAGE_MODES, stage_streams
from clinicalgpt.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def corpus_texts(cfg: Config):
    """Training text for the tokenizer, streamed from the record shards: model.tokenizer_train_chars
    characters shared equally by the tasks (a task with less text leaves its share to the others)."""
    task_dirs = sorted((cfg.data_dir / "records" / "train").iterdir())
    budget = cfg.model.tokenizer_train_chars
    for i, task_dir in enumerate(task_dirs):
        share = budget // (len(task_dirs) - i)  # an equal share of what is left
        for batch in (b for f in sorted(task_dir.glob("*.parquet"))
                      for b in pq.ParquetFile(f).iter_batches(batch_size=1000, columns=["messages", "rejected"])):
            for msgs, rejected in zip(batch.column("messages").to_pylist(), batch.column("rejected").to_pylist()):
                text = "\n".join(m["content"] for m in msgs) + ("\n" + rejected if rejected else "")
                yield text
                share -= len(text)
                budget -= len(text)
                if share <= 0:
                    break
            if share <= 0:
                break


@ray.remote(num_cpus=1, max_calls=1)  # a fresh process that exits after: its memory goes back to the OS
def _train_tokenizer(cfg: Config) -> int:
    tok = train_tokenizer(corpus_texts(cfg), cfg.model.vocab_size)
    Path(cfg.model_path).mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, cfg.model_path, cfg.model.arch)
    return len(tok)


def ensure_tokenizer(cfg: Config) -> str:
    """Train and save the preset's tokenizer if it trains its own; return where it lives."""
    if cfg.model.train_tokenizer:
        started = time.time()
        size = ray.get(_train_tokenizer.remote(cfg))
        print(f"[data] trained tokenizer: {size} tokens in {time.time() - started:.1f}s -> {cfg.model_path}")
    return cfg.model_path


class CountTokens:
    """Ray Data callable: per-batch token counts by (split, task): tokens, trained (response) tokens and
    records over max_len. What packing gives is in each packed stream's summary."""

    def __init__(self, tokenizer_path: str, chat_template: str, max_len: int):
        self.tokenizer = load_tokenizer(tokenizer_path, chat_template)
        self.max_len = max_len

    def __call__(self, batch: pa.Table) -> dict:
        chats = [[dict(m) for m in msgs] for msgs in batch.column("messages").to_pylist()]
        totals: Counter = Counter()
        for split, task, (ids, labels) in zip(batch.column("split").to_pylist(), batch.column("task").to_pylist(),
                                              tokenize_chats(self.tokenizer, chats)):
            totals[(split, task, "records")] += 1
            totals[(split, task, "tokens")] += len(ids)
            totals[(split, task, "trained_tokens")] += sum(x != IGNORE for x in labels)
            totals[(split, task, "over_max_len")] += len(ids) > self.max_len
        keys = list(totals)
        return {"split": [k[0] for k in keys], "task": [k[1] for k in keys], "stat": [k[2] for k in keys],
                "value": [int(totals[k]) for k in keys]}


def token_counts(cfg: Config) -> dict:
    """Token counts per split and task."""
    ds = read_records(cfg, ["train", "valid", "rl", "test"]).map_batches(
        CountTokens, fn_constructor_kwargs={"tokenizer_path": cfg.model_path, "chat_template": cfg.model.chat_template,
                                            "max_len": cfg.seq.max_len},
        batch_format="pyarrow", batch_size=cfg.data.batch_size, concurrency=1)  # one actor: bounded memory (two were no faster here)
    out: dict = {}
    for row in ds.iter_rows():
        node = out.setdefault(row["split"], {}).setdefault(row["task"], Counter())
        node[row["stat"]] += row["value"]
    return {split: {task: dict(c) for task, c in sorted(tasks.items())} for split, tasks in out.items()}


def write_report(manifest: dict, out: Path) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2))
    lines = ["# Data manifest", "", f"Data root: `{manifest['data_root']}`", "",
             f"Built in {manifest['seconds']} s (records), whole job {manifest['job_seconds']} s, "
             f"peak memory {manifest['peak_memory_gb']} GB.", "",
             "## Records per task and split", "", "| task | " + " | ".join(manifest["splits"]) + " |",
             "|---|" + "---|" * len(manifest["splits"])]
    for task in manifest["totals"]["by_task"]:
        row = [sum(manifest["records"].get(s, {}).get(task, {}).values()) for s in manifest["splits"]]
        lines.append(f"| {task} | " + " | ".join(f"{n:,}" for n in row) + " |")
    lines += ["", "## Records per source", "", "| source | records |", "|---|---|"]
    lines += [f"| {s} | {n:,} |" for s, n in manifest["totals"]["by_source"].items()]
    lines += ["", "## Tokens", "", "| split | task | tokens | trained tokens | over max_len |", "|---|---|---|---|---|"]
    for split, tasks in manifest.get("tokens", {}).items():
        for task, c in tasks.items():
            lines.append(f"| {split} | {task} | {c.get('tokens', 0):,} | {c.get('trained_tokens', 0):,} | "
                         f"{c.get('over_max_len', 0):,} |")
    if "streams" in manifest:
        lines += ["", f"## Packed streams (packed/, rows of {manifest['max_len']} tokens; what pretrain and SFT read)", "",
                  "| stream | samples | rows | filled | samples over max_len | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {s['samples']:,} | {s['rows']:,} | {s['packing_efficiency']:.1%} | "
                  f"{s['skipped_over_length']:,} | {s['seconds']} |" for name, s in manifest["streams"].items()]
    lines += ["", "## Skipped input lines (see skipped.jsonl)", "", "| source | reason | lines |", "|---|---|---|"]
    lines += [f"| {s} | {r} | {n:,} |" for s, rs in manifest["skipped"].items() for r, n in rs.items()] or ["| - | - | 0 |"]
    lines += ["", "## Dropped records", "", "| source | reason | records |", "|---|---|---|"]
    lines += [f"| {s} | {r} | {n:,} |" for s, rs in manifest["dropped"].items() for r, n in rs.items()] or ["| - | - | 0 |"]
    (out / "manifest.md").write_text("\n".join(lines) + "\n")


def print_summary(m: dict) -> None:
    print("\n[data] records per task:", ", ".join(f"{k} {v:,}" for k, v in m["totals"]["by_task"].items()))
    print("[data] records per split:", ", ".join(f"{k} {v:,}" for k, v in m["totals"]["by_split"].items()))
    print("[data] records per source:")
    for s, n in m["totals"]["by_source"].items():
        print(f"    {s:55s} {n:>9,}")
    if "tokens" in m:
        train = m["tokens"].get("train", {})
        print("[data] train tokens:", ", ".join(f"{t} {c['tokens']:,}" for t, c in train.items()))
    print(f"[data] skipped {m['skipped_total']:,} lines:",
          ", ".join(f"{s}/{r} {n}" for s, rs in m["skipped"].items() for r, n in rs.items()) or "none")
    dropped = Counter()
    for reasons in m["dropped"].values():
        dropped.update(reasons)
    print(f"[data] dropped {m['dropped_total']:,} records:", ", ".join(f"{r} {n:,}" for r, n in dropped.items()))
    print(f"[data] {m['job_seconds']} s, peak memory {m['peak_memory_gb']} GB -> {m['records_dir']}")


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    started = time.time()
    with PeakMemory() as mem:
        init_ray(cfg)
        manifest = build_records(cfg)
        ensure_tokenizer(cfg)
        manifest["tokens"] = token_counts(cfg)
        manifest["streams"] = {name: stream_summary(packed_stream(cfg, name, spec))
                               for stage in STAGE_MODES for name, spec in stage_streams(cfg, stage).items()}
    manifest.update(splits=["train", "valid", "rl", "test"], max_len=cfg.seq.max_len,
                    job_seconds=round(time.time() - started, 1), peak_memory_gb=round(mem.peak_gb, 2))
    write_report(manifest, cfg.data_dir)
    print_summary(manifest)
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
