"""Chats -> token ids with response-only labels -> fixed-length packed sequences, on Ray Data.

Labels are -100 everywhere except the assistant turns (content and end-of-turn token), which is the
paper's SFT loss: (1/n) sum over response tokens of -log p(w_i | w_<i). Packed rows carry
position_ids that restart at 0 for each sample; transformers turns restarts into a block-diagonal
causal mask (masking_utils.find_packed_sequence_indices), so packed samples never attend to each other;
it does so only without attention_mask and KV cache: call the model with use_cache=False.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from .records import hash_fraction

IGNORE = -100


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns (including end-of-turn).

    Spans come from rendering growing prefixes, so any prefix-stable chat template works."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if not text.startswith(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)):
            raise ValueError("the chat template is not prefix-stable; response masks cannot be derived")
        spans.append((start, end))
    return text, spans


def tokenize_chats(tokenizer, chats: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per chat; labels copy the ids inside assistant spans, else IGNORE."""
    rendered = [assistant_spans(tokenizer, chat) for chat in chats]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        labels = [IGNORE] * len(ids)
        for t, (a, b) in enumerate(offsets):
            if b > a and any(s <= a < e for s, e in spans):
                labels[t] = ids[t]
        out.append((ids, labels))
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


def keep_sampled(batch: pa.Table, fractions: dict[str, float], seed: int) -> pa.Table:
    """Ray Data map: keep each record of task t with probability fractions[t] (default 1), by a hash of
    its id, so a stage can rebalance a corpus dominated by one task."""
    keep = [hash_fraction("sample", str(seed), i) < fractions.get(t, 1.0)
            for i, t in zip(batch.column("id").to_pylist(), batch.column("task").to_pylist())]
    return batch.filter(pa.array(keep))


def packed_dataset(cfg, splits: list[str], tasks: list[str], mode: str = "chat", shuffle_seed: int | None = None,
                   fractions: dict[str, float] | None = None) -> ray.data.Dataset:
    """A packed stream: records of `tasks` in `splits`, optionally subsampled per task (`fractions`) and
    shuffled row by row (shuffle_seed; the corpus is written grouped by task, and training on one task's
    shard at a time would swing the loss), tokenized and packed by Ray Data actors (fractional CPUs, so
    they share cores with the training workers)."""
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
