"""PPO's data: the records of the prompt tasks (ppo.prompt_tasks), rendered with the chat template and
tokenized by Ray Data, as a resumable stream of training prompts and a fixed set of held-out ones (and exam
questions); and PPO-ptx's language-model rows, the SFT stage's packed training stream."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import ray

from ..config import Config
from ..tokenizer import load_tokenizer, prompt_ids


def chat_prompt_ids(tok, chat: list[dict]) -> list[int]:
    """A record's chat up to (without) its reference reply, rendered with the generation prompt and tokenized."""
    return prompt_ids(tok, chat[:-1] if chat[-1]["role"] == "assistant" else chat)


class TokenizePrompts:
    """Ray Data callable: records -> the chat up to (without) the reference reply, rendered with the
    generation prompt and tokenized. Over-long prompts keep their length so the driver can count them."""

    def __init__(self, tokenizer_path: str, chat_template: str):
        self.tok = load_tokenizer(tokenizer_path, chat_template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [chat_prompt_ids(self.tok, chat) for chat in batch.column("messages").to_pylist()]
        return pa.table({"id": batch.column("id"), "prompt_ids": pa.array(ids, pa.list_(pa.int64()))})


def prompt_dataset(cfg: Config, split: str) -> ray.data.Dataset:
    from ..corpus import read_records
    ds = read_records(cfg, [split], list(cfg.ppo.prompt_tasks)).map_batches(
        TokenizePrompts, fn_constructor_kwargs={"tokenizer_path": cfg.model_path, "chat_template": cfg.model.chat_template},
        batch_format="pyarrow", batch_size=256, concurrency=1, num_cpus=0.5)
    ds.context.execution_options.preserve_order = True  # the same order every run: resumable, comparable
    return ds


def held_out_prompts(cfg: Config) -> list[list[int]]:
    """The first ppo.eval_prompts validation prompts that fit ppo.max_prompt_len: the same every run."""
    from ..corpus import first_records
    tok = load_tokenizer(cfg.model_path, cfg.model.chat_template)
    rows = first_records(cfg, ["valid"], list(cfg.ppo.prompt_tasks), cfg.ppo.eval_prompts * 4)
    ids = [chat_prompt_ids(tok, r["messages"]) for r in rows]
    return [p for p in ids if len(p) <= cfg.ppo.max_prompt_len][:cfg.ppo.eval_prompts]


def held_out_exam(cfg: Config) -> list[tuple[list[int], dict[str, str]]]:
    """The first ppo.eval_exam_prompts exam questions of the training split that fit ppo.max_prompt_len, with their
    options: the same every run. Answered greedily for the answer format, not accuracy (SFT trained on them)."""
    from ..corpus import first_records
    if not cfg.ppo.eval_exam_prompts:
        return []
    tok = load_tokenizer(cfg.model_path, cfg.model.chat_template)
    out = []
    for r in first_records(cfg, ["train"], ["exam"], cfg.ppo.eval_exam_prompts * 4):
        ids = prompt_ids(tok, list(r["messages"][:-1]))
        if len(ids) <= cfg.ppo.max_prompt_len:
            out.append((ids, json.loads(r["meta"])["options"]))
    return out[:cfg.ppo.eval_exam_prompts]


class PromptStream:
    """Training prompts from Ray Data, epoch after epoch (shuffled per epoch with a seeded buffer);
    `consumed` is the data position a checkpoint records, so a resumed run skips what it has seen."""

    def __init__(self, cfg: Config, consumed: int = 0):
        self.ds, self.max_len, self.seed = prompt_dataset(cfg, "rl"), cfg.ppo.max_prompt_len, cfg.ppo.seed
        self.consumed, self.skipped_long = consumed, 0
        self._rows = self._forever(consumed)

    def _forever(self, skip: int):
        epoch = 0
        while True:
            batches = iter(self.ds.iter_batches(batch_size=256, batch_format="numpy", local_shuffle_buffer_size=2048,
                                                local_shuffle_seed=self.seed + epoch))
            try:
                for batch in batches:
                    for ids in batch["prompt_ids"]:
                        if skip > 0:
                            skip -= 1
                            continue
                        yield ids
            finally:  # on close(): stop Ray Data's executor, whose thread would otherwise outlive ray.shutdown()
                batches.close()
            epoch += 1

    def take(self, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            ids = next(self._rows)
            self.consumed += 1
            if len(ids) > self.max_len:
                self.skipped_long += 1
                continue
            out.append(ids.tolist())
        return out

    def close(self) -> None:
        self._rows.close()


class PtxStream:
    """PPO-ptx's language-model rows: the SFT stage's packed training stream (Ray Data), epoch after epoch, from
    row `skip` (a resumed run skips what its steps took: rl.ptx_rows_per_rank a rank a step)."""

    def __init__(self, cfg: Config, skip: int = 0):
        from ..packing import packed_stream, read_stream
        from ..stages import stage_streams
        name, spec = next(iter(stage_streams(cfg, "sft").items()))  # sft_train
        self.ds = read_stream(packed_stream(cfg, name, spec))
        self._rows = self._forever(skip)

    def _forever(self, skip: int):
        while True:
            batches = iter(self.ds.iter_batches(batch_size=64, batch_format="numpy"))
            try:
                for batch in batches:
                    for i in range(len(batch["input_ids"])):
                        if skip > 0:
                            skip -= 1
                            continue
                        yield {k: v[i] for k, v in batch.items()}
            finally:  # on close(), as PromptStream
                batches.close()

    def take(self, n: int) -> dict[str, np.ndarray]:
        rows = [next(self._rows) for _ in range(n)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def close(self) -> None:
        self._rows.close()
