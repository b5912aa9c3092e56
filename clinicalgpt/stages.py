"""The causal-LM training stages (domain pretraining and SFT) as trainer Tasks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, TrainConfig
from .modeling import load_model
from .trainer import Task, apply_lora, causal_lm_loss, export_hf

# Tasks whose text teaches the model medicine: everything with a training split except preference pairs.
CORPUS_TASKS = ["kg_qa", "community_qa", "exam", "dialogue", "diagnosis"]


class CausalLMTask(Task):
    """Next-token loss on packed rows; the model starts from `source` (a HF folder or hub name), with
    LoRA adapters when the stage's lora.enabled is set. Exports the merged model (and the adapter)."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source

    def build_model(self, cfg: Config, tc: TrainConfig) -> torch.nn.Module:
        return apply_lora(load_model(self.source, cfg.model.dtype), tc.lora)

    def loss(self, model, batch):
        return causal_lm_loss(model, batch)

    def export(self, model: torch.nn.Module, cfg: Config, out: Path) -> None:
        export_hf(model, cfg, out, adapter_dir=out.parent / "adapter")


def estimated_rows(cfg: Config, splits: list[str], tasks: list[str], fractions: dict[str, float]) -> int:
    """Packed rows of a stream, from the data manifest's token counts (for epoch-based step counts)."""
    manifest = json.loads((cfg.data_dir / "manifest.json").read_text())
    tokens = sum(manifest["tokens"].get(s, {}).get(t, {}).get("tokens", 0) * fractions.get(t, 1.0)
                 for s in splits for t in tasks)
    return max(1, int(tokens) // cfg.seq.max_len)


def run_causal_stage(cfg: Config, name: str, tc: TrainConfig, source: str, mode: str) -> dict:
    """Train stage `name` from `source` on the packed corpus stream (mode "text" or "chat"), evaluate on
    the held-out QA and dialogue sets, and return the loss-curve summary."""
    from .packing import packed_dataset
    from .trainer import fit, steps_for, summarize_history, take_rows

    train = packed_dataset(cfg, ["train"], CORPUS_TASKS, mode=mode, shuffle_seed=tc.seed, fractions=tc.task_fractions)
    eval_rows = take_rows(packed_dataset(cfg, ["valid"], ["community_qa", "dialogue"], mode=mode), tc.eval_rows)
    steps = steps_for(tc, estimated_rows(cfg, ["train"], CORPUS_TASKS, tc.task_fractions))
    result = fit(cfg, CausalLMTask(name, source), tc, train, steps, eval_rows)
    if result.error:
        raise SystemExit(f"[{name}] training failed: {result.error}")
    summary = summarize_history(cfg.stage_dir(name) / "history.jsonl")
    summary["model"] = str(cfg.stage_dir(name) / "final")
    (cfg.stage_dir(name) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[{name}] done: {summary['steps']} steps, held-out loss {summary['first_eval_loss']:.3f} -> "
          f"{summary['last_eval_loss']:.3f}, {summary['mean_tokens_per_s']:,.0f} tok/s; model -> {summary['model']}")
    return summary
