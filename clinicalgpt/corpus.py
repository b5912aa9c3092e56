"""Build the training and evaluation records from the corpora with Ray Data.

    source files --SourceRowsDatasource--> map_batches(records_from_rows) --> records (+ skips with reasons)
    KG files --flat_map(inverse triples)--> groupby(object) --> inverse KG QA records
                                                    |
    driver sink: drop duplicates and test overlaps, write Parquet shards records/<split>/<task>/ and
    the skipped rows (skipped.jsonl, nothing is lost); count records, skips and drops for the manifest.

Two passes keep test items out of training: pass 1 builds only the sources that can hold test
records and collects their question keys; pass 2 builds everything else and drops any non-test
record whose question key is a test key.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from .config import Config, SourceSpec
from .kg_templates import RELATION_KIND, clean_objects
from .records import RECORD_SCHEMA, Skip, dedup_key, leak_key, parse_object
from .source_files import SUFFIXES, SourceRowsDatasource, row_count, source_files
from .sources import INVERSE_KINDS, builder_for, kg_inverse_record, may_hold_test

# Columns the build step adds to each record; the sink uses and drops them.
BUILD_SCHEMA = RECORD_SCHEMA.append(pa.field("skip", pa.string())) \
    .append(pa.field("raw", pa.string())) \
    .append(pa.field("n_inputs", pa.int8())) \
    .append(pa.field("dedup_key", pa.int64())) \
    .append(pa.field("leak_key", pa.int64())) \
    .append(pa.field("redacted", pa.string()))


class SourceError(RuntimeError):
    """A configured source is missing or unreadable, or none of its rows fits its format."""


def source_name(spec: SourceSpec) -> str:
    """What records, counts and skips call a source: its path under the data root, less the file type."""
    path = spec.path.rstrip("/")
    suffix = Path(path).suffix
    return path.removesuffix(suffix) if suffix in SUFFIXES else path


def resolve_sources(cfg: Config) -> dict[str, SourceSpec]:
    """Absolute file path -> spec, after checking that every source exists and can be read. A folder source gives
    each of its files, with the split its name gives where the spec sets none."""
    resolved = {}
    for spec in cfg.data.sources:
        try:
            builder_for(spec)
        except ValueError as e:
            raise SourceError(f"source {spec.path}: {e}") from None
        path = cfg.data_root / spec.path
        if not path.exists():
            raise SourceError(f"source not found: {path} (data root {cfg.data_root}; set "
                              f"CLINICALGPT_DATA_ROOT or data.root)")
        files = source_files(path)
        if not files:
            raise SourceError(f"source {path}: no {', '.join(SUFFIXES)} file"
                              + (" (a folder: a datasets save_to_disk folder or a folder of such files)"
                                 if path.is_dir() else ""))
        for file, split in files:
            if not os.access(file, os.R_OK):
                raise SourceError(f"source file not readable: {file}")
            resolved[str(file)] = replace(spec, split=spec.split or split)
    return resolved


def _skip_row(path: str, line: int, source: str, reason: str, raw: str, redacted: str) -> dict:
    return {"id": f"{path}:{line}", "task": "", "source": source, "split": "", "messages": [], "rejected": None,
            "meta": "{}", "skip": reason, "raw": raw, "n_inputs": 1, "dedup_key": 0, "leak_key": 0,
            "redacted": redacted}


def records_from_rows(batch: pa.Table, specs: dict[str, SourceSpec], cfg: Config, keep_test_only: bool) -> pa.Table:
    """Ray Data map: source rows -> records; every row yields records or one skip row."""
    out, builders = [], {path: builder_for(spec) for path, spec in specs.items()}
    columns = ("path", "line", "text", "problem", "redacted")
    for path, line, text, problem, redacted in zip(*(batch.column(c).to_pylist() for c in columns)):
        spec = specs[path]
        source = source_name(spec)
        try:
            if problem:
                raise Skip(problem)
            records = builders[path](parse_object(text), source, spec.split, cfg.data)
            for rec in records:
                chars = sum(len(m["content"]) for m in rec["messages"]) + len(rec["rejected"] or "")
                if chars > cfg.data.max_record_chars:
                    raise Skip("over_length")
        except Skip as skip:
            out.append(_skip_row(path, line, source, str(skip), text[:2000], redacted))
            continue
        if keep_test_only:
            records = [r for r in records if r["split"] == "test"]
        for i, rec in enumerate(records):
            out.append({**rec, "skip": "", "raw": None, "n_inputs": int(i == 0),
                        "dedup_key": dedup_key(rec), "leak_key": leak_key(rec), "redacted": redacted if i == 0 else ""})
        if not records:  # a row whose records all belong to the other pass still counts as read
            out.append({**_skip_row(path, line, source, "", None, redacted), "skip": "other_pass"})
    return pa.Table.from_pylist(out, schema=BUILD_SCHEMA)


def inverse_triples(batch: pa.Table, specs: dict[str, SourceSpec]) -> pa.Table:
    """(graph, kind, object, subject) rows for the relations asked in reverse."""
    rows = defaultdict(list)
    for path, text, problem in zip(*(batch.column(c).to_pylist() for c in ("path", "text", "problem"))):
        try:
            obj = None if problem else parse_object(text)
        except Skip:
            obj = None  # counted by the forward pass
        if obj is None or not isinstance(obj.get("o"), list) or not isinstance(obj.get("s"), str):
            continue
        kind = RELATION_KIND.get(obj.get("p"))
        if kind not in INVERSE_KINDS:
            continue
        for o in clean_objects(obj["o"]):
            rows["source"].append(source_name(specs[path]))
            rows["graph"].append(specs[path].kind.removeprefix("kg_"))
            rows["kind"].append(kind)
            rows["object"].append(o)
            rows["subject"].append(obj["s"].strip())
    schema = pa.schema([(c, pa.string()) for c in ("source", "graph", "kind", "object", "subject")])
    return pa.table(dict(rows), schema=schema) if rows else schema.empty_table()


def inverse_records(group: pa.Table, cfg: Config) -> pa.Table:
    source, graph, kind, obj = (group.column(c)[0].as_py() for c in ("source", "graph", "kind", "object"))
    subjects = sorted(set(group.column("subject").to_pylist()))
    rec = kg_inverse_record(graph, kind, obj, subjects, source, cfg.data)
    row = {**rec, "skip": "", "raw": None, "n_inputs": 0, "dedup_key": dedup_key(rec), "leak_key": leak_key(rec),
           "redacted": ""}
    return pa.Table.from_pylist([row], schema=BUILD_SCHEMA)


class ShardWriter:
    """Parquet shards per (split, task), rolled every `shard_rows` rows."""

    def __init__(self, root: Path, shard_rows: int):
        self.root, self.shard_rows = root, shard_rows
        self.writers: dict[tuple[str, str], tuple[pq.ParquetWriter, int, int]] = {}

    def write(self, table: pa.Table):
        for (split, task), part in _group(table, ("split", "task")):
            part = part.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
            while part.num_rows:
                writer, rows, shard = self.writers.get((split, task), (None, 0, -1))
                if writer is None or rows >= self.shard_rows:
                    if writer is not None:
                        writer.close()
                    shard += 1
                    path = self.root / split / task / f"part-{shard:05d}.parquet"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writer, rows = pq.ParquetWriter(path, RECORD_SCHEMA), 0
                room = self.shard_rows - rows
                writer.write_table(part.slice(0, room))
                self.writers[(split, task)] = (writer, rows + min(room, part.num_rows), shard)
                part = part.slice(room)

    def close(self):
        for writer, _, _ in self.writers.values():
            writer.close()


def _group(table: pa.Table, keys: tuple[str, ...]):
    cols = [table.column(k).to_pylist() for k in keys]
    groups = defaultdict(list)
    for i, key in enumerate(zip(*cols)):
        groups[key].append(i)
    for key, idx in groups.items():
        yield key, table.take(idx)


def _sorted_by_id(ds: ray.data.Dataset):
    """A dataset's rows as one table sorted by id, for a small one whose block order is not its own: a groupby's
    partitions come out in the order they finish, and sorted, every build writes them, and so every stream and pair
    derived from the records, in the same order."""
    tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    if tables:
        yield pa.concat_tables(tables).sort_by("id")


def build_records(cfg: Config) -> dict:
    """Build all records under cfg.data_dir/records; return the manifest (counts, skips, drops)."""
    started = time.time()
    specs = resolve_sources(cfg)
    out = cfg.data_dir
    records_dir = out / "records"
    if records_dir.exists():
        shutil.rmtree(records_dir)
    records_dir.mkdir(parents=True)

    # Settings for these pipelines only (Ray Data captures the context when a dataset is created).
    ctx = ray.data.DataContext.get_current().copy()
    ctx.execution_options.preserve_order = True  # first occurrence wins deterministically
    ctx.max_hash_shuffle_aggregators = 2  # the inverse-KG groupby is small; each aggregator is a process
    # As many tasks at once as there are cores (a local cluster has more logical CPUs, for training):
    # each worker process keeps the memory it grew to, so more of them only cost memory.
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(
        cpu=os.cpu_count(), gpu=float("inf"), object_store_memory=float("inf"), memory=float("inf"))

    def read(paths):  # datasets derived from this one keep its context
        with ray.data.DataContext.current(ctx):
            return ray.data.read_datasource(SourceRowsDatasource(paths, deidentify=cfg.data.deidentify))

    writer = ShardWriter(records_dir, cfg.data.shard_rows)
    counts: Counter = Counter()  # (split, task, source) -> records
    skips: Counter = Counter()  # (source, reason) -> rows
    first_skip: dict[str, tuple[str, int, str]] = {}  # source -> (file, line, reason) of its first skipped row
    redacted: Counter = Counter()  # kind -> details de-identified (data.deidentify)
    dropped: Counter = Counter()  # (source, reason) -> records dropped as duplicate / test overlap
    skipped_file = open(out / "skipped.jsonl", "w", encoding="utf-8")

    # Pass 1: test records first, so their question keys are known before anything else is written.
    test_paths = [p for p, s in specs.items() if may_hold_test(s.kind, s.split)]
    test_keys: set[int] = set()
    seen: set[tuple[str, int]] = set()  # (split, dedup key): duplicates are dropped within a split
    if test_paths:
        ds = read(test_paths).map_batches(records_from_rows, batch_format="pyarrow", batch_size=cfg.data.batch_size,
                                          fn_kwargs={"specs": specs, "cfg": cfg, "keep_test_only": True})
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = block.filter(pc.equal(block.column("skip"), ""))
            keep = []
            columns = (rows.column(c).to_pylist() for c in ("source", "dedup_key", "leak_key"))
            for i, (src, dk, lk) in enumerate(zip(*columns)):
                if ("test", dk) in seen:
                    dropped[(src, "duplicate")] += 1
                    continue
                seen.add(("test", dk))
                test_keys.add(lk)
                keep.append(i)
            kept = rows.take(pa.array(keep, pa.int64()))
            writer.write(kept)
            for split, task, src in zip(*(kept.column(c).to_pylist() for c in ("split", "task", "source"))):
                counts[(split, task, src)] += 1

    # Pass 2: everything that is not test, plus the KG inverse questions.
    paths = list(specs)
    ds = read(paths).map_batches(records_from_rows, batch_format="pyarrow", batch_size=cfg.data.batch_size,
                                 fn_kwargs={"specs": specs, "cfg": cfg, "keep_test_only": False})
    blocks = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    kg_paths = [p for p, s in specs.items() if s.kind.startswith("kg_")]
    if cfg.data.kg_inverse and kg_paths:
        inverse = (read(kg_paths)
                   .map_batches(inverse_triples, batch_format="pyarrow", fn_kwargs={"specs": specs})
                   .groupby(["source", "kind", "object"], num_partitions=8)
                   .map_groups(inverse_records, batch_format="pyarrow", fn_kwargs={"cfg": cfg}))
        blocks = itertools.chain(blocks, _sorted_by_id(inverse))

    totals = [row_count(p) for p in paths]
    bar = tqdm(total=None if None in totals else sum(totals), desc="building records", unit=" rows", mininterval=5)
    for block in blocks:
        bar.update(int(np.sum(block.column("n_inputs").to_numpy())))
        keep = []
        for i, (src, split, skip, raw, line_id, dk, lk, found) in enumerate(zip(*(block.column(c).to_pylist() for c in (
                "source", "split", "skip", "raw", "id", "dedup_key", "leak_key", "redacted")))):
            if found:
                redacted.update(json.loads(found))
            if skip:
                if skip != "other_pass":
                    skips[(src, skip)] += 1
                    file, line = line_id.rsplit(":", 1)
                    file = os.path.relpath(file, cfg.data_root)
                    first_skip.setdefault(src, (file, int(line), skip))
                    skipped_file.write(json.dumps({"source": src, "file": file, "line": int(line), "reason": skip,
                                                   "raw": raw}, ensure_ascii=False) + "\n")
                continue
            if split == "test":
                continue  # written in pass 1
            if lk in test_keys:
                dropped[(src, "overlaps_test")] += 1
                continue
            if (split, dk) in seen:
                dropped[(src, "duplicate")] += 1
                continue
            seen.add((split, dk))
            keep.append(i)
        kept = block.take(pa.array(keep, pa.int64()))
        writer.write(kept)
        for split, task, src in zip(*(kept.column(c).to_pylist() for c in ("split", "task", "source"))):
            counts[(split, task, src)] += 1
    bar.close()
    writer.close()
    skipped_file.close()
    _fail_on_sources_that_fit_nothing(specs, counts, dropped, first_skip)

    manifest = {
        "data_root": str(cfg.data_root),
        "records_dir": str(records_dir),
        "seconds": round(time.time() - started, 1),
        "records": _nested(counts),
        "totals": {
            "by_split": _sum_by(counts, 0),
            "by_task": _sum_by(counts, 1),
            "by_source": _sum_by(counts, 2),
            "records": sum(counts.values()),
        },
        "skipped": _nested(skips),
        "skipped_total": sum(skips.values()),
        "dropped": _nested(dropped),
        "dropped_total": sum(dropped.values()),
        "deidentified": dict(sorted(redacted.items())) if cfg.data.deidentify else None,
    }
    return manifest


def _fail_on_sources_that_fit_nothing(specs: dict[str, SourceSpec], counts: Counter, dropped: Counter,
                                      first_skip: dict[str, tuple[str, int, str]]) -> None:
    """A source none of whose rows became a record is misdeclared (its format, fields or file): say where."""
    kept = {src for (_, _, src) in counts} | {src for (src, _) in dropped}
    for spec in {source_name(s): s for s in specs.values()}.values():
        src = source_name(spec)
        if src not in kept and src in first_skip:
            file, line, reason = first_skip[src]
            raise SourceError(f"source {src} (kind {spec.kind}): none of its rows fits; the first, {file} line {line}, "
                              f"is skipped as {reason} (see skipped.jsonl; fields maps a format's names to the file's)")


def _nested(counter: Counter) -> dict:
    tree: dict = {}
    for key, n in sorted(counter.items()):
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = n
    return tree


def _sum_by(counter: Counter, pos: int) -> dict:
    out: Counter = Counter()
    for key, n in counter.items():
        out[key[pos]] += n
    return dict(sorted(out.items()))


def record_files(cfg: Config, splits: list[str], tasks: list[str] | None = None) -> list[str]:
    """The built record shards of the given splits (and tasks); none where the data file has no such sources."""
    root = cfg.data_dir / "records"
    return sorted(str(p) for split in splits for p in (root / split).glob("*/*.parquet")
                  if tasks is None or p.parent.name in tasks)


def first_records(cfg: Config, splits: list[str], tasks: list[str], n: int) -> list[dict]:
    """The first n records of the given splits and tasks, in shard order, read directly: a fixed small set (PPO's
    held-out prompts) without starting a Ray Data pipeline for it."""
    rows: list[dict] = []
    for path in record_files(cfg, splits, tasks):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=max(n, 1)):
            rows += batch.to_pylist()[:n - len(rows)]
            if len(rows) == n:
                return rows
    return rows


def read_records(cfg: Config, splits: list[str], tasks: list[str] | None = None) -> ray.data.Dataset:
    """Stream the built records of the given splits (and tasks) as a Ray Dataset, one block per shard."""
    files = record_files(cfg, splits, tasks)
    if not files:
        raise FileNotFoundError(f"no records for splits={splits} tasks={tasks} under {cfg.data_dir / 'records'}: "
                                f"run jobs/data.py with sources of these (data.sources)")
    return ray.data.read_parquet(files, schema=RECORD_SCHEMA, override_num_blocks=len(files))
