"""The causal-LM training stages (domain pretraining and SFT) as trainer Tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import Config, TrainConfig
from .modeling import apply_lora, load_model
from .trainer import Task, causal_lm_loss, export_hf

# Tasks whose text teaches the model medicine: everything with a training split except preference pairs.
CORPUS_TASKS = ["kg_qa", "community_qa", "exam", "dialogue", "diagnosis"]
# How each causal stage reads the records: pretraining on plain text, SFT on chats with response-only labels;
# plain documents (format text) only pretrain: they hold no replies to fine-tune on.
STAGE_MODES = {"pretrain": "text", "sft": "chat"}
STAGE_TASKS = {"pretrain": CORPUS_TASKS + ["text"], "sft": CORPUS_TASKS}


class CausalLMTask(Task):
    """Next-token loss on packed rows; the model starts from `source` (a HF folder or hub name), with
    LoRA adapters when the stage's lora.enabled is set. Exports the merged model (and the adapter)."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source

    def build_model(self, cfg: Config, train_cfg: TrainConfig) -> torch.nn.Module:
        return apply_lora(load_model(self.source, cfg.model.dtype), train_cfg.lora)

    def loss(self, model, batch):
        return causal_lm_loss(model, batch)

    def export(self, model: torch.nn.Module, cfg: Config, out: Path) -> None:
        export_hf(model, cfg, out, adapter_dir=out.parent / "adapter")


def stage_streams(cfg: Config, stage: str) -> dict[str, dict]:
    """The packed streams a causal stage reads: its training stream (sampled and shuffled by the stage's
    settings) and its held-out set (the QA and dialogue validation records)."""
    train_cfg, mode = getattr(cfg, stage), STAGE_MODES[stage]
    return {f"{stage}_train": {"mode": mode, "splits": ["train"], "tasks": STAGE_TASKS[stage],
                               "fractions": dict(sorted(train_cfg.task_fractions.items())), "seed": train_cfg.seed},
            f"{stage}_eval": {"mode": mode, "splits": ["valid"], "tasks": ["community_qa", "dialogue"]}}


def run_causal_stage(cfg: Config, name: str, train_cfg: TrainConfig, source: str, argv: list[str]) -> dict:
    """Train stage `name` from `source` on its packed corpus stream, evaluate on its held-out set, and
    return the loss-curve summary. The data job packs the streams; a stage whose settings changed since
    packs its own."""
    from .lineage import record_stage
    from .packing import first_rows, packed_stream, read_stream, stream_summary
    from .trainer import fit, steps_for, summarize_history

    started = time.time()
    train, held_out = (packed_stream(cfg, stream, spec) for stream, spec in stage_streams(cfg, name).items())
    steps = steps_for(train_cfg, stream_summary(train)["rows"])
    result = fit(cfg, CausalLMTask(name, source), train_cfg, read_stream(train), steps,
                 first_rows(held_out, train_cfg.eval_rows))
    if result.error:
        raise SystemExit(f"[{name}] training failed: {result.error}")
    summary = summarize_history(cfg.stage_dir(name) / "history.jsonl")
    summary["model"] = str(cfg.stage_dir(name) / "final")
    (cfg.stage_dir(name) / "summary.json").write_text(json.dumps(summary, indent=2))
    record_stage(cfg, name, argv, started, summary)
    print(f"[{name}] done: {summary['steps']} steps, held-out loss {summary['first_eval_loss']:.3f} -> "
          f"{summary['last_eval_loss']:.3f}, {summary['mean_tokens_per_s']:,.0f} tok/s; model -> {summary['model']}")
    return summary
