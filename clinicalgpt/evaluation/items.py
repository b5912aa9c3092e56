"""The evaluation items and the candidates' answers to them.

Items: the test records each family reads (the bias family: its attitude-scale file), the same seeded sample for
every candidate. Candidates: local models, answering greedily through vLLM rollout engines on Ray (with the
likelihood of each fixed choice: exam options, scale points), or OpenAI-compatible endpoints (no likelihoods).
Answers are generated a fixed chunk of items at a time and appended to items.jsonl as each chunk comes, so that a
rerun after a crash generates only the chunks it lacks; greedy decoding of the same chunk gives the same answers."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray

from ..config import Config, EndpointConfig
from ..packing import files_fingerprint
from ..records import hash_fraction
from ..tokenizer import load_tokenizer, prompt_ids
from .bias import load_bias_items

# The families read from the test split, by the task of their records; "bias" reads its item file.
FAMILY_TASK = {"conversation": "dialogue", "exam": "exam", "diagnosis": "diagnosis", "qa": "community_qa",
               "safety": "safety"}
FAMILIES = [*FAMILY_TASK, "bias"]
# What a candidate answering through an endpoint cannot give: the likelihood of fixed choices.
ENDPOINT_CANNOT = ["exam option likelihood", "bias scale-point likelihood"]


def load_items(cfg: Config) -> dict[str, list[dict]]:
    """family -> its items, the same seeded sample for every candidate: id, source, messages (the prompt),
    reference, meta, and the fixed replies whose likelihood is scored (`choices`, label -> text) where it has them."""
    from ..corpus import read_records
    items = {}
    for family in cfg.eval.families:
        if family == "bias":  # whole forward/reverse pairs, in a seeded order of pairs
            rows = load_bias_items(cfg.eval.bias_items)
            rows.sort(key=lambda r: (hash_fraction("eval", str(cfg.eval.seed), r["meta"]["pair"]), r["meta"]["keying"]))
        else:
            records = read_records(cfg, ["test"], [FAMILY_TASK[family]]).take_all()
            records.sort(key=lambda r: hash_fraction("eval", str(cfg.eval.seed), r["id"]))
            rows = [{"id": r["id"], "source": r["source"], "messages": list(r["messages"][:-1]),
                     "reference": r["messages"][-1]["content"], "meta": json.loads(r["meta"] or "{}")} for r in records]
            if family == "exam" and cfg.eval.exam_likelihood:  # the SFT format of an answer
                for r in rows:
                    r["choices"] = {letter: f"答案：{letter}。{text}" for letter, text in r["meta"]["options"].items()}
        n = cfg.eval.items.get(family, 0)
        items[family] = rows[:n] if n else rows
    return items


@dataclass
class Candidate:
    """A system under evaluation: a local model (its folder or hub name) or an OpenAI-compatible endpoint."""

    name: str
    path: str = ""
    endpoint: EndpointConfig | None = None

    def fingerprint(self) -> str:
        """What its answers depend on: a local model's files, or the endpoint's URL and model."""
        if self.endpoint:
            return f"{self.endpoint.url} {self.endpoint.model}"
        return files_fingerprint(Path(self.path)) if Path(self.path).is_dir() else self.path


def candidates(cfg: Config) -> list[Candidate]:
    """eval.models as candidates: endpoints by their eval.endpoints name, the rest as stage names or model paths
    (cfg.stage_model says which stage to run first)."""
    return [Candidate(n, endpoint=cfg.eval.endpoints[n]) if n in cfg.eval.endpoints else Candidate(n, cfg.stage_model(n))
            for n in cfg.eval.models]


def drop_long(cfg: Config, items: dict[str, list[dict]], tokenizers: list) -> dict[str, int]:
    """Items whose prompt does not fit the model length with its answer under any local model's tokenizer are
    dropped (every candidate answers the same items); the counts per family are returned."""
    skipped = {}
    for family, rows in items.items():
        limit = cfg.seq.max_len - cfg.eval.max_new_tokens[family]
        kept = [r for r in rows if all(len(prompt_ids(t, r["messages"])) <= limit for t in tokenizers)]
        skipped[family], items[family] = len(rows) - len(kept), kept
    return skipped


def read_jsonl(path: Path, fields: tuple[str, ...]) -> tuple[list[dict], int]:
    """The rows of a JSON-lines file that a crash may have cut (absent: none), and how many lines were torn (not
    JSON objects with `fields`)."""
    rows, torn = [], 0
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if all(f in row for f in fields):
                rows.append(row)
                continue
        except (json.JSONDecodeError, TypeError):
            pass
        torn += 1
    return rows, torn


class AnswerStore:
    """items.jsonl: a line per candidate and item, appended a whole chunk at a time (flushed and synced to disk) as
    its answers come. Each line names its chunk by a key of everything its answers depend on (the candidate's
    weights or endpoint, the generation settings, the chunk's items); a chunk is reused when all its lines are
    there. A line torn by a crash is skipped and counted."""

    def __init__(self, path: Path):
        self.path, self.chunks = path, {}
        rows, self.torn = read_jsonl(path, ("chunk", "id"))
        for row in rows:
            self.chunks.setdefault(row["chunk"], {})[row["id"]] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        if self.torn:
            self.file.write("\n")  # a torn last line may lack its newline

    def get(self, key: str, ids: list[str]) -> list[dict] | None:
        rows = self.chunks.get(key, {})
        return [rows[i] for i in ids] if all(i in rows for i in ids) else None

    def put(self, key: str, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.chunks[key] = {r["id"]: r for r in rows}

    def close(self) -> None:
        self.file.close()


def chunk_key(cfg: Config, fingerprint: str, family: str, chunk: list[dict]) -> str:
    """What a chunk's answers depend on: the candidate (its fingerprint), the generation settings and the items."""
    settings = {"candidate": fingerprint, "family": family, "ids": [r["id"] for r in chunk],
                "max_new_tokens": cfg.eval.max_new_tokens[family], "max_len": cfg.seq.max_len, "seed": cfg.eval.seed,
                "dtype": cfg.model.dtype, "chat_template": cfg.model.chat_template,
                "engine": cfg.eval.engine.vllm_args(), "choices": [r.get("choices", {}) for r in chunk]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


Job = tuple[str, list[dict], str]  # a chunk to answer: its family, items and key


def answer(cfg: Config, candidate: Candidate, items: dict[str, list[dict]], store: AnswerStore,
           engines_for: Callable[[], list]) -> tuple[dict[str, list[dict]], int]:
    """The candidate's answer to every item, family -> a dict per item (answer, truncated, choice_logprobs where it
    has them, error when an endpoint failed it after its retries); and how many were reused from the store.
    engines_for() starts or loads the local model's engines, only when a chunk is missing."""
    fingerprint, size = candidate.fingerprint(), cfg.eval.chunk_items
    chunks = [(family, rows[start:start + size]) for family, rows in items.items()
              for start in range(0, len(rows), size)]
    chunks = [(family, chunk, chunk_key(cfg, fingerprint, family, chunk)) for family, chunk in chunks]
    done = {key: rows for _, chunk, key in chunks if (rows := store.get(key, [r["id"] for r in chunk]))}
    jobs = [job for job in chunks if job[2] not in done]
    reused, todo = sum(len(chunk) for _, chunk, key in chunks if key in done), sum(len(job[1]) for job in jobs)
    print(f"[eval] {candidate.name}: {reused} of {reused + todo} answers reused from {store.path.name}, {todo} to "
          "generate", flush=True)
    if jobs:
        replies = (endpoint_replies(cfg, candidate.endpoint, jobs) if candidate.endpoint
                   else engine_replies(cfg, load_tokenizer(candidate.path, cfg.model.chat_template), engines_for(), jobs))
        started, answered = time.time(), 0
        for (family, chunk, key), chunk_replies in replies:
            done[key] = [{"chunk": key, "candidate": candidate.name, "family": family, "id": r["id"], **reply}
                         for r, reply in zip(chunk, chunk_replies)]
            if not any("error" in row for row in done[key]):  # failed requests are asked again by a rerun
                store.put(key, done[key])
            answered += len(chunk)
            rate = answered / (time.time() - started)
            print(f"[eval] {candidate.name}: {answered}/{todo} answers ({family}), {rate:.1f} items/s, "
                  f"ETA {(todo - answered) / rate:.0f}s", flush=True)
    answers = {family: [] for family in items}
    for family, _, key in chunks:
        answers[family] += done[key]
    return answers, reused


def engine_replies(cfg: Config, tok, engines: list, jobs: list[Job]) -> Iterator[tuple[Job, list[dict]]]:
    """Each chunk's greedy answers (and the mean log-prob per token of each fixed choice) from the rollout engines,
    the chunks spread over them, in the order they finish."""
    pending = {}
    for k, (family, chunk, _) in enumerate(jobs):
        engine = engines[k % len(engines)]
        generated = engine.generate.remote([prompt_ids(tok, r["messages"]) for r in chunk], 1,
                                           cfg.eval.max_new_tokens[family], 0.0, 1.0, cfg.eval.seed, logprobs=False)
        owners = [(i, label) for i, r in enumerate(chunk) for label in r.get("choices", {})]
        scored = engine.continuation_logprobs.remote(
            [prompt_ids(tok, chunk[i]["messages"]) for i, _ in owners],
            [tok(chunk[i]["choices"][label], add_special_tokens=False)["input_ids"] for i, label in owners]
        ) if owners else None
        pending[generated] = (k, owners, scored)
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        k, owners, scored = pending.pop(ready)
        samples = ray.get(ready)
        replies = [{"answer": tok.decode(s["ids"], skip_special_tokens=True), "truncated": s["truncated"]}
                   for s in samples]
        for (i, label), logprobs in zip(owners, ray.get(scored) if scored else []):
            replies[i].setdefault("choice_logprobs", {})[label] = sum(logprobs) / len(logprobs)
        yield jobs[k], replies


def endpoint_client(cfg: Config, endpoint: EndpointConfig):
    """An OpenAI client for the endpoint: transient errors (connection, 408, 429, 5xx) retried eval.retries times
    with exponential backoff by the client itself."""
    from openai import OpenAI
    return OpenAI(base_url=endpoint.url, api_key=os.environ.get(endpoint.key_env) or "none",
                  max_retries=cfg.eval.retries, timeout=300)


def endpoint_replies(cfg: Config, endpoint: EndpointConfig, jobs: list[Job]) -> Iterator[tuple[Job, list[dict]]]:
    """Each chunk's answers from an OpenAI-compatible chat endpoint (temperature 0, the family's token limit),
    endpoint.concurrency requests in flight, chunk by chunk; a request that still fails after the retries is
    answered by its error."""
    import openai
    client = endpoint_client(cfg, endpoint)

    def ask(family: str, row: dict) -> dict:
        try:
            reply = client.chat.completions.create(model=endpoint.model, messages=row["messages"], temperature=0,
                                                   max_tokens=cfg.eval.max_new_tokens[family], seed=cfg.eval.seed)
        except openai.APIError as e:
            return {"answer": "", "truncated": False, "error": f"{type(e).__name__}: {e}"[:300]}
        choice = reply.choices[0]
        return {"answer": choice.message.content or "", "truncated": choice.finish_reason == "length"}

    with ThreadPoolExecutor(endpoint.concurrency) as pool:
        futures = [[pool.submit(ask, family, r) for r in chunk] for family, chunk, _ in jobs]
        for job, chunk_futures in zip(jobs, futures):
            yield job, [f.result() for f in chunk_futures]
    client.close()
