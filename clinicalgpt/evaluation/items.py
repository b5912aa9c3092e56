"""The evaluation items: the test records each family reads, the same seeded sample for every model, and the
models' greedy answers to them (and their exam option likelihoods) from vLLM rollout engines on Ray."""

from __future__ import annotations

import json
import time

import numpy as np
import ray

from ..config import Config
from ..records import hash_fraction
from ..tokenizer import load_tokenizer, prompt_ids

FAMILY_TASK = {"conversation": "dialogue", "exam": "exam", "diagnosis": "diagnosis", "qa": "community_qa",
               "safety": "safety"}


def load_items(cfg: Config) -> dict[str, list[dict]]:
    """family -> its test records, the same seeded sample for every model."""
    from ..corpus import read_records
    items = {}
    for family in cfg.eval.families:
        rows = read_records(cfg, ["test"], [FAMILY_TASK[family]]).take_all()
        rows.sort(key=lambda r: hash_fraction("eval", str(cfg.eval.seed), r["id"]))
        n = cfg.eval.items.get(family, 0)
        items[family] = [{"id": r["id"], "source": r["source"], "messages": list(r["messages"][:-1]),
                          "reference": r["messages"][-1]["content"], "meta": json.loads(r["meta"] or "{}")}
                         for r in (rows[:n] if n else rows)]
    return items


def drop_long(cfg: Config, items: dict[str, list[dict]], tokenizers: list) -> dict[str, int]:
    """Items whose prompt does not fit the model length with its answer under any model's tokenizer are
    dropped (every model answers the same items); the counts per family are reported."""
    skipped = {}
    for family, rows in items.items():
        limit = cfg.seq.max_len - cfg.eval.max_new_tokens[family]
        kept = [r for r in rows if all(len(prompt_ids(t, r["messages"])) <= limit for t in tokenizers)]
        skipped[family], items[family] = len(rows) - len(kept), kept
    return skipped


def answer_all(cfg: Config, name: str, path: str, engines: list, items: dict[str, list[dict]]) -> dict:
    """One model's greedy answers to every family's items from its engines: family -> the answers; "truncated":
    family -> whether the token limit cut each answer; "exam_likelihood": the exam option each finds likeliest."""
    tok = load_tokenizer(path, cfg.model.chat_template)
    answers = {"truncated": {}}
    for family, rows in items.items():
        started = time.time()
        prompts = [prompt_ids(tok, r["messages"]) for r in rows]
        chunks = np.array_split(np.arange(len(prompts)), len(engines))
        refs = [a.generate.remote([prompts[i] for i in c], 1, cfg.eval.max_new_tokens[family], 0.0, 1.0, cfg.eval.seed,
                                  logprobs=False) for a, c in zip(engines, chunks) if len(c)]
        samples = [s for part in ray.get(refs) for s in part]
        answers[family] = tok.batch_decode([s["ids"] for s in samples], skip_special_tokens=True)
        answers["truncated"][family] = [s["truncated"] for s in samples]
        seconds = time.time() - started
        print(f"[eval] {name}: {family} {len(rows)} items in {seconds:.1f}s ({len(rows) / seconds:.1f} items/s)",
              flush=True)
    if "exam" in items and cfg.eval.exam_likelihood:
        started = time.time()
        answers["exam_likelihood"] = option_likelihood(tok, engines, items["exam"])
        print(f"[eval] {name}: exam option likelihoods of {len(items['exam'])} items in {time.time() - started:.1f}s",
              flush=True)
    return answers


def option_requests(tok, rows: list[dict]) -> tuple[list[list[int]], list[list[int]], list[tuple[int, str]]]:
    """Each exam item's options as token ids: the item's prompt and the option's reply ("答案：X。text", the SFT
    format); and the (item, letter) of each."""
    prompts, continuations, owners = [], [], []
    for i, r in enumerate(rows):
        head = prompt_ids(tok, r["messages"])
        for letter, text in r["meta"]["options"].items():
            prompts.append(head)
            continuations.append(tok(f"答案：{letter}。{text}", add_special_tokens=False)["input_ids"])
            owners.append((i, letter))
    return prompts, continuations, owners


def option_likelihood(tok, engines: list, rows: list[dict]) -> list[str]:
    """For each exam item, the option whose reply (option_requests) the model gives the highest mean log-prob per
    token."""
    prompts, continuations, owners = option_requests(tok, rows)
    chunks = np.array_split(np.arange(len(prompts)), len(engines))
    refs = [a.continuation_logprobs.remote([prompts[i] for i in c], [continuations[i] for i in c])
            for a, c in zip(engines, chunks) if len(c)]
    logprobs = [lp for part in ray.get(refs) for lp in part]
    best: dict[int, tuple[float, str]] = {}
    for (i, letter), lp in zip(owners, logprobs):
        score = float(np.mean(lp))
        if i not in best or score > best[i][0]:
            best[i] = (score, letter)
    return [best[i][1] for i in range(len(rows))]
