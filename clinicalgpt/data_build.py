"""The data stage: the records (corpus.py), the tokenizer of presets that train their own, token counts, the
packed streams that pretrain and SFT read, the reward model's pairs, and the manifest that reports them all
(manifest.json / .md).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from .config import Config
from .corpus import build_records, read_records, record_files
from .packing import IGNORE, packed_stream, stream_summary, tokenize_chats
from .records import SPLITS
from .reward_model import has_pair_records, pair_table
from .stages import STAGE_MODES, stage_streams
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def build_data(cfg: Config) -> dict:
    """Build everything under cfg.data_dir that the later stages read; return the manifest, less the whole
    job's wall time and peak memory, which the caller measures and adds before write_manifest."""
    manifest = build_records(cfg)
    ensure_tokenizer(cfg)
    manifest["tokens"] = token_counts(cfg)
    # What the data file has sources for: a file of evaluation sources alone packs no training streams.
    streams = {name: spec for stage in STAGE_MODES for name, spec in stage_streams(cfg, stage).items()}
    manifest["streams"] = {name: stream_summary(packed_stream(cfg, name, spec)) for name, spec in streams.items()
                           if record_files(cfg, spec["splits"], spec["tasks"])}
    has_pairs = has_pair_records(cfg)
    manifest["pairs"] = stream_summary(pair_table(cfg)) if has_pairs else None
    for name in [*(n for n in streams if n not in manifest["streams"]), *([] if has_pairs else ["pairs"])]:
        print(f"[data] {name}: no records for it in data.sources, not built")
    manifest.update(splits=list(SPLITS), max_len=cfg.seq.max_len)
    return manifest


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
        if not record_files(cfg, ["train"]):
            raise SystemExit("[data] the preset trains its tokenizer on the training records, and data.sources has "
                             "none: set model.path to a model with its tokenizer and model.train_tokenizer=false")
        started = time.time()
        size = ray.get(_train_tokenizer.remote(cfg))
        print(f"[data] trained tokenizer: {size} tokens in {time.time() - started:.1f}s -> {cfg.model_path}")
    return cfg.model_path


class CountTokens:
    """Ray Data callable: per-batch token counts by (split, task): tokens, trained (response) tokens and
    records over max_len. What packing gives is in each packed stream's summary."""

    def __init__(self, tokenizer_path: str, chat_template: str, max_len: int):
        # The pass's only actor (token_counts): its tokenizer may use the cores the pass leaves idle.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
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
    # One actor: bounded memory. Two took 39 s against 53, but their second process put the data job's peak in the
    # test session at 4.19 GB, over the 4 GB it must stay under (tests/test_data_job.py).
    ds = read_records(cfg, list(SPLITS)).map_batches(
        CountTokens, fn_constructor_kwargs={"tokenizer_path": cfg.model_path, "chat_template": cfg.model.chat_template,
                                            "max_len": cfg.seq.max_len},
        batch_format="pyarrow", batch_size=cfg.data.batch_size, concurrency=1)
    out: dict = {}
    for row in ds.iter_rows():
        node = out.setdefault(row["split"], {}).setdefault(row["task"], Counter())
        node[row["stat"]] += row["value"]
    return {split: {task: dict(c) for task, c in sorted(tasks.items())} for split, tasks in out.items()}


def write_manifest(manifest: dict, out: Path) -> None:
    """manifest.json, and manifest.md: the same counts as tables."""
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
    for split, tasks in manifest["tokens"].items():
        for task, c in tasks.items():
            lines.append(f"| {split} | {task} | {c.get('tokens', 0):,} | {c.get('trained_tokens', 0):,} | "
                         f"{c.get('over_max_len', 0):,} |")
    lines += ["", f"## Packed streams (packed/, rows of {manifest['max_len']} tokens; what pretrain and SFT read)", "",
              "| stream | samples | rows | filled | samples over max_len | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {s['samples']:,} | {s['rows']:,} | {s['packing_efficiency']:.1%} | "
              f"{s['skipped_over_length']:,} | {s['seconds']} |" for name, s in manifest["streams"].items()]
    if manifest["pairs"]:
        pairs = manifest["pairs"]["pairs"]
        lines += ["", f"## Reward-model pairs (pairs/; built in {manifest['pairs']['seconds']} s)", "",
                  "| source | train | test |", "|---|---|---|"]
        lines += [f"| {s} | {pairs['train'].get(s, 0):,} | {pairs['test'].get(s, 0):,} |"
                  for s in sorted({*pairs["train"], *pairs["test"]})]
    if manifest["deidentified"] is not None:
        lines += ["", "## De-identified details (data.deidentify; replaced by typed placeholders)", "",
                  "| kind | details |", "|---|---|"]
        lines += [f"| {k} | {n:,} |" for k, n in manifest["deidentified"].items()] or ["| - | 0 |"]
    lines += ["", "## Skipped input lines (see skipped.jsonl)", "", "| source | reason | lines |", "|---|---|---|"]
    lines += _reason_rows(manifest["skipped"])
    lines += ["", "## Dropped records", "", "| source | reason | records |", "|---|---|---|"]
    lines += _reason_rows(manifest["dropped"])
    (out / "manifest.md").write_text("\n".join(lines) + "\n")


def _reason_rows(counts: dict) -> list[str]:
    """Table rows of {source: {reason: count}}."""
    return [f"| {s} | {r} | {n:,} |" for s, rs in counts.items() for r, n in rs.items()] or ["| - | - | 0 |"]


def print_summary(manifest: dict) -> None:
    totals = manifest["totals"]
    print("\n[data] records per task:", ", ".join(f"{k} {v:,}" for k, v in totals["by_task"].items()))
    print("[data] records per split:", ", ".join(f"{k} {v:,}" for k, v in totals["by_split"].items()))
    print("[data] records per source:")
    for s, n in totals["by_source"].items():
        print(f"    {s:55s} {n:>9,}")
    train = manifest["tokens"].get("train", {})
    print("[data] train tokens:", ", ".join(f"{t} {c['tokens']:,}" for t, c in train.items()))
    print(f"[data] skipped {manifest['skipped_total']:,} rows:",
          ", ".join(f"{s}/{r} {n}" for s, rs in manifest["skipped"].items() for r, n in rs.items()) or "none")
    dropped = Counter()
    for reasons in manifest["dropped"].values():
        dropped.update(reasons)
    print(f"[data] dropped {manifest['dropped_total']:,} records:",
          ", ".join(f"{r} {n:,}" for r, n in dropped.items()))
    if manifest["deidentified"] is not None:
        print("[data] de-identified:", ", ".join(f"{k} {n:,}" for k, n in manifest["deidentified"].items()) or "none")
    print(f"[data] {manifest['job_seconds']} s, peak memory {manifest['peak_memory_gb']} GB "
          f"-> {manifest['records_dir']}")
