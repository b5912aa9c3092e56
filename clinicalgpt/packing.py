"""Chats -> token ids with response-only labels -> fixed-length packed sequences, on Ray Data; written
once as Parquet streams that the training stages read.

Labels are -100 everywhere except the assistant turns (content and end-of-turn token), which is the
paper's SFT loss: (1/n) sum over response tokens of -log p(w_i | w_<i). Packed rows carry
position_ids that restart at 0 for each sample; transformers turns restarts into a block-diagonal
causal mask (masking_utils.find_packed_sequence_indices), so packed samples never attend to each other;
it does so only without attention_mask and KV cache: call the model with use_cache=False.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from .records import hash_fraction

IGNORE = -100


def render(tokenizer, chats: list[list[dict]], **options) -> list[str]:
    """Each chat through the chat template, in one call (transformers' set-up once per batch, not per chat)."""
    return tokenizer.apply_chat_template(chats, tokenize=False, **options) if chats else []


def assistant_spans(tokenizer, chats: list[list[dict]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each chat rendered, with the character spans of its assistant turns (including end-of-turn).

    Spans come from rendering growing prefixes, so any prefix-stable chat template works."""
    texts = render(tokenizer, chats)
    turns = [(c, i) for c, chat in enumerate(chats) for i, m in enumerate(chat) if m["role"] == "assistant"]
    starts = render(tokenizer, [chats[c][:i] for c, i in turns], add_generation_prompt=True)
    inner = [(c, i) for c, i in turns if i < len(chats[c]) - 1]  # a last turn ends where its whole chat does
    throughs = dict(zip(inner, render(tokenizer, [chats[c][:i + 1] for c, i in inner])))
    spans: list[list[tuple[int, int]]] = [[] for _ in chats]
    for (c, i), start in zip(turns, starts):
        through = throughs.get((c, i), texts[c])
        if not texts[c].startswith(through):
            raise ValueError("the chat template is not prefix-stable; response masks cannot be derived")
        spans[c].append((len(start), len(through)))
    return list(zip(texts, spans))


def tokenize_chats(tokenizer, chats: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per chat; labels copy the ids of tokens that start inside an assistant span,
    else IGNORE."""
    rendered = assistant_spans(tokenizer, chats)
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        ids = np.asarray(ids, dtype=np.int64)
        starts, ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).T
        trained = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            trained |= (starts >= s) & (starts < e)
        trained &= ends > starts  # tokens that cover no characters (special tokens added by the tokenizer)
        out.append((ids.tolist(), np.where(trained, ids, IGNORE).tolist()))
    return out


def tokenize_texts(tokenizer, texts: list[str], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Plain documents for causal-LM pretraining: every token is trained; a document longer than
    max_len is cut into max_len pieces (pretraining loses nothing to length)."""
    enc = tokenizer([t + tokenizer.eos_token for t in texts], add_special_tokens=False)["input_ids"]
    return [(ids[i:i + max_len], ids[i:i + max_len]) for ids in enc for i in range(0, len(ids), max_len)
            if len(ids[i:i + max_len]) > 1]


def pack(samples: list[tuple[list[int], list[int]]], max_len: int, pad_id: int,
         together: bool = True) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing into rows of exactly max_len tokens (together=False: one sample
    per row, for models that cannot take per-sample positions). Samples longer than max_len must be
    filtered out before. Padding is its own segment with IGNORE labels."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i][0]))
    rows: list[list[int]] = []  # sample indices per row
    room: list[int] = []
    for i in order:
        n = len(samples[i][0])
        for r, free in enumerate(room if together else []):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    ids = np.full((len(rows), max_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), max_len), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), max_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s_ids, s_labels = samples[i]
            n = len(s_ids)
            ids[r, at:at + n] = s_ids
            labels[r, at:at + n] = s_labels
            positions[r, at:at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(max_len - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "num_samples": np.array([len(m) for m in rows], dtype=np.int64),
            "num_tokens": np.array([max_len - free for free in room], dtype=np.int64)}


class TokenizeAndPack:
    """Ray Data callable: a batch of records -> packed rows. mode "chat": the chat template with
    response-only labels (SFT); "text": the messages' text as one document, all tokens trained."""

    def __init__(self, tokenizer_path: str, chat_template: str, max_len: int, together: bool, mode: str):
        from .tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_path, chat_template)
        self.max_len, self.together, self.mode = max_len, together, mode

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        messages = batch.column("messages").to_pylist()
        if self.mode == "text":
            texts = ["\n".join(m["content"] for m in msgs) for msgs in messages]
            samples = tokenize_texts(self.tokenizer, texts, self.max_len)
        else:
            samples = tokenize_chats(self.tokenizer, [[dict(m) for m in msgs] for msgs in messages])
        fits = [s for s in samples if len(s[0]) <= self.max_len]
        packed = pack(fits, self.max_len, self.tokenizer.pad_token_id, self.together)
        n = len(packed["num_samples"])
        packed["skipped_over_length"] = np.zeros(n, dtype=np.int64)
        if n:
            packed["skipped_over_length"][0] = len(samples) - len(fits)
        return packed


def keep_sampled(batch: pa.Table, fractions: dict[str, float], seed: int, group: str = "task",
                 keys: tuple[str, ...] = ("id",), salt: str = "sample") -> pa.Table:
    """Ray Data map: keep each row of group g (its `group` column: a task, a pair source) with probability
    fractions[g] (default 1), by a hash of its `keys` columns, so a stage can rebalance data dominated by
    one group. The same rows each run."""
    columns = [batch.column(c).to_pylist() for c in (group, *keys)]
    keep = [hash_fraction(salt, str(seed), *key) < fractions.get(g, 1.0) for g, *key in zip(*columns)]
    return batch.filter(pa.array(keep, type=pa.bool_()))


def packed_dataset(cfg, splits: list[str], tasks: list[str], mode: str = "chat", shuffle_seed: int | None = None,
                   fractions: dict[str, float] | None = None) -> ray.data.Dataset:
    """A packed stream: records of `tasks` in `splits`, optionally subsampled per task (`fractions`) and
    shuffled row by row (shuffle_seed; the corpus is written grouped by task, and training on one task's
    shard at a time would swing the loss), tokenized and packed by Ray Data actors."""
    from .corpus import read_records
    records = read_records(cfg, splits, tasks)
    if fractions:
        records = records.map_batches(keep_sampled, batch_format="pyarrow",
                                      fn_kwargs={"fractions": dict(fractions), "seed": cfg.data.seed})
    if shuffle_seed is not None:
        records = records.random_shuffle(seed=shuffle_seed)
    return records.map_batches(
        TokenizeAndPack, fn_constructor_kwargs={"tokenizer_path": cfg.model_path,
                                                "chat_template": cfg.model.chat_template,
                                                "max_len": cfg.seq.max_len, "together": cfg.seq.pack,
                                                "mode": mode},
        batch_format="pyarrow", batch_size=cfg.data.batch_size, concurrency=(1, 2), num_cpus=0.5)


# What training reads of a packed row (the rest are packing statistics).
TRAIN_COLUMNS = ["input_ids", "labels", "position_ids", "num_samples", "num_tokens"]


def tokenizer_fingerprint(cfg) -> str:
    """Identifies the tokenizer and chat template a stream was packed with."""
    from .tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.model_path, cfg.model.chat_template)
    return hashlib.sha256((tok.backend_tokenizer.to_str() + tok.chat_template).encode()).hexdigest()[:16]


def files_fingerprint(folder: Path, pattern: str = "*") -> str:
    """Identifies the files under `folder` that match `pattern`: their paths relative to it (a run may reach it
    through a link), sizes and modification times."""
    files = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in folder.rglob(pattern) if f.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def records_fingerprint(cfg) -> str:
    """Identifies the record shards a derived table was built from."""
    return files_fingerprint(cfg.data_dir / "records", "*.parquet")


def built_once(folder: Path, shape: dict, build: Callable[[Path], dict]) -> Path:
    """`folder`, built by build(an empty folder) -> summary unless its stream.json says it was built with `shape`
    (then kept as it is); the summary is saved beside the shape. A folder is either whole or absent."""
    info = folder / "stream.json"
    if info.exists() and json.loads(info.read_text())["shape"] == shape:
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    summary = build(partial)
    (partial / "stream.json").write_text(json.dumps({"shape": shape, **summary}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def packed_stream(cfg, name: str, spec: dict) -> Path:
    """The folder of packed stream `name` (records of spec's splits and tasks, sampled by its fractions,
    shuffled by its seed, tokenized in its mode and packed), written once under data/packed/ by Ray Data
    and rewritten only when what shapes it changes (spec, sequence settings, tokenizer, records)."""
    shape = {**spec, "max_len": cfg.seq.max_len, "pack": cfg.seq.pack, "tokenizer": tokenizer_fingerprint(cfg),
             "records": records_fingerprint(cfg)}

    def build(partial: Path) -> dict:
        started = time.time()
        print(f"[data] packing the {name} stream ({spec['mode']} mode, {'+'.join(spec['splits'])}: "
              f"{', '.join(spec['tasks'])})", flush=True)
        # The same rows in the same files every build: init_ray keeps Ray Data's blocks in order.
        packed_dataset(cfg, spec["splits"], spec["tasks"], mode=spec["mode"], shuffle_seed=spec.get("seed"),
                       fractions=spec.get("fractions")).write_parquet(str(partial))
        stats = pq.read_table(partial, columns=["num_samples", "num_tokens", "skipped_over_length"])
        total = {c: int(pc.sum(stats[c]).as_py() or 0) for c in stats.column_names}
        rows = stats.num_rows
        summary = {"rows": rows, "samples": total["num_samples"], "skipped_over_length": total["skipped_over_length"],
                   "packing_efficiency": round(total["num_tokens"] / max(rows * cfg.seq.max_len, 1), 4),
                   "seconds": round(time.time() - started, 1)}
        print(f"[data] {name}: {summary['samples']:,} samples -> {rows:,} rows of {cfg.seq.max_len} "
              f"({summary['packing_efficiency']:.1%} filled) in {summary['seconds']} s", flush=True)
        return summary

    return built_once(cfg.data_dir / "packed" / name, shape, build)


def stream_summary(folder: Path) -> dict:
    """What packing a stream gave: rows, samples, samples over max_len, fill, seconds."""
    return {k: v for k, v in json.loads((folder / "stream.json").read_text()).items() if k != "shape"}


def read_stream(folder: Path) -> ray.data.Dataset:
    """A packed stream as a Ray Dataset, one block per file, in the order it was written (shuffled)."""
    files = sorted(str(f) for f in folder.glob("*.parquet"))
    return ray.data.read_parquet(files, columns=TRAIN_COLUMNS, override_num_blocks=len(files))


def first_rows(folder: Path, n: int) -> dict[str, np.ndarray]:
    """The first n rows of a packed stream as numpy arrays (a stage's fixed held-out set), read directly."""
    table = pq.ParquetDataset(sorted(str(f) for f in folder.glob("*.parquet"))).read(columns=TRAIN_COLUMNS).slice(0, n)
    return {c: np.array(table.column(c).to_pylist(), dtype=np.int64) for c in TRAIN_COLUMNS}
