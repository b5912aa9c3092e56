"""Offline preference optimisation (the DPO family): the SFT model trained on the reward model's preference pairs
directly, with no reward model and no sampling.

    reference pass:  Ray Data actors with the frozen SFT model add each pair's reference log-probs (once; kept)
    training:        trainer.fit with DpoTask (LoRA on the SFT model, ZeRO-2), its loss from the policy's log-probs
                     and the pair's reference ones (loss: sigmoid = DPO, ipo, simpo: reference-free)
    held-out pairs:  the implicit reward's accuracy and margin per source, and how the policy moved each reply's
                     log-prob (both falling is DPO's known failure), beside the SFT model's own preference
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
import torch.nn.functional as F

from .config import DPO_LOSSES, Config, DPOConfig
from .modeling import apply_lora, load_model, zero_dropout
from .reward_model import (length_balanced_shards, length_groups, padded, read_pairs, reply_logprobs,
                           training_pairs)
from .trainer import Task, export_hf


def preference_loss(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor] | None,
                    reply_len: tuple[torch.Tensor, torch.Tensor], settings: DPOConfig):
    """Per pair: (loss, chosen reward, rejected reward), from the summed log-probs of the chosen and rejected replies
    under the policy and the reference (None for simpo) and the replies' lengths in tokens.
      sigmoid  r = beta * (log pi - log ref);  -(1 - e) log sigmoid(r_c - r_r) - e log sigmoid(r_r - r_c)
      ipo      h = (log pi - log ref) / length;  (h_c - h_r - 1 / (2 beta))^2;  rewards beta * h
      simpo    r = beta * log pi / length;  -(1 - e) log sigmoid(r_c - r_r - gamma) - e log sigmoid(gamma - r_c + r_r)
    (e: label_smoothing, gamma: simpo_gamma)."""
    beta, smoothing = settings.beta, settings.label_smoothing
    if settings.loss == "sigmoid":
        chosen, rejected = (beta * (p - r) for p, r in zip(policy, reference))
        z = chosen - rejected
    elif settings.loss == "ipo":
        chosen, rejected = ((p - r) / n for p, r, n in zip(policy, reference, reply_len))
        return (chosen - rejected - 1 / (2 * beta)) ** 2, beta * chosen, beta * rejected
    elif settings.loss == "simpo":
        chosen, rejected = (beta * p / n for p, n in zip(policy, reply_len))
        z = chosen - rejected - settings.simpo_gamma
    else:
        raise ValueError(f"dpo.loss={settings.loss!r}: one of {', '.join(DPO_LOSSES)}")
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z), chosen, rejected


def pair_logprobs(model, pairs: dict[str, np.ndarray], pad_id: int, device: str, batch_size: int) -> np.ndarray:
    """[pairs, 2]: the summed log-prob of the chosen (column 0) and rejected reply under a causal LM, in batches of
    batch_size pairs of about one length (reply_logprobs then trims most padding)."""
    out = np.zeros((len(pairs["chosen_ids"]), 2))
    lengths = np.maximum((pairs["chosen_ids"] != pad_id).sum(1), (pairs["rejected_ids"] != pad_id).sum(1))
    order = np.argsort(lengths, kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids = np.concatenate([pairs["chosen_ids"][rows], pairs["rejected_ids"][rows]])
            lens = np.concatenate([pairs["chosen_reply_len"][rows], pairs["rejected_reply_len"][rows]])
            summed = reply_logprobs(model, torch.as_tensor(ids, device=device), torch.as_tensor(lens, device=device),
                                    pad_id).cpu().numpy()
            out[rows] = np.stack([summed[:len(rows)], summed[len(rows):]], axis=1)
    return out


def scoring_model(model_dir: str, dtype: str, bf16: bool | None) -> tuple[torch.nn.Module, str]:
    """(model, device) to score pairs with, in the precision the policy trains in (DeepSpeed's bf16 casts the model
    to bf16 where the hardware computes it: runtime.resolve_bf16, on this worker), so that the reference log-probs
    are the policy's own at the start and the held-out scores compare like with like."""
    from .runtime import resolve_bf16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(model_dir, "bfloat16" if resolve_bf16(bf16) else dtype).to(device).eval(), device


class ReferenceLogprobs:
    """Ray Data callable: tokenized pairs -> the same pairs with ref_chosen_logp and ref_rejected_logp, the frozen
    SFT model's summed log-probs of each reply (one model per actor, on the actor's GPU where it has one)."""

    def __init__(self, model_dir: str, dtype: str, bf16: bool | None, pad_id: int, max_len: int, batch_size: int):
        self.model, self.device = scoring_model(model_dir, dtype, bf16)
        self.pad_id, self.max_len, self.batch_size = pad_id, max_len, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        logps = pair_logprobs(self.model, padded(batch, self.pad_id, self.max_len), self.pad_id, self.device,
                              self.batch_size)
        return (batch.append_column("ref_chosen_logp", pa.array(logps[:, 0], pa.float32()))
                .append_column("ref_rejected_logp", pa.array(logps[:, 1], pa.float32())))


def with_reference(cfg: Config, settings: DPOConfig, source: str, pairs: pa.Table, pad_id: int) -> pa.Table:
    """`pairs` with the SFT model's log-probs of each reply (ReferenceLogprobs on the stage's worker resources), kept
    under dpo/reference/ and computed again only when the SFT model, the pairs or the dtype change."""
    import pyarrow.parquet as pq
    from .packing import built_once, files_fingerprint
    shape = {"model": files_fingerprint(Path(source)), "pairs": files_fingerprint(cfg.data_dir / "pairs", "*.parquet"),
             "pair_half": settings.pair_half, "pair_fractions": dict(sorted(settings.pair_fractions.items())),
             "seed": settings.seed, "dtype": cfg.model.dtype, "bf16": settings.bf16}

    def build(partial: Path) -> dict:
        started, done, last_line = time.time(), 0, time.time()
        # By length, so that each batch holds pairs of about one length; in blocks enough to keep every actor busy.
        by_length = pc.sort_indices(pa.table({"n": pc.max_element_wise(pc.list_value_length(pairs["chosen_ids"]),
                                                                       pc.list_value_length(pairs["rejected_ids"]))}),
                                    sort_keys=[("n", "ascending")])
        ordered, blocks = pairs.take(by_length), 8 * settings.num_workers
        bounds = [i * ordered.num_rows // blocks for i in range(blocks + 1)]
        # A forward pass of micro_batch pairs, as in training (on a GPU: the memory the plan counts).
        model = {"model_dir": source, "dtype": cfg.model.dtype, "bf16": settings.bf16, "pad_id": pad_id,
                 "max_len": cfg.seq.max_len, "batch_size": settings.micro_batch}
        scored = ray.data.from_arrow([ordered.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]).map_batches(
            ReferenceLogprobs, fn_constructor_kwargs=model, batch_format="pyarrow", batch_size=64,
            concurrency=settings.num_workers,
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker)
        partial.mkdir(parents=True)
        writer = None
        for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            writer = writer or pq.ParquetWriter(partial / "reference.parquet", batch.schema)
            writer.write_table(batch)
            done += batch.num_rows
            if time.time() - last_line > 10 or done == pairs.num_rows:
                rate = done / (time.time() - started)
                print(f"[dpo] reference log-probs: {done:,}/{pairs.num_rows:,} pairs, {rate:,.1f} pairs/s, "
                      f"ETA {(pairs.num_rows - done) / rate:,.0f}s", flush=True)
                last_line = time.time()
        writer.close()
        return {"pairs": done, "seconds": round(time.time() - started, 1)}

    folder = built_once(cfg.stage_dir("dpo") / "reference", shape, build)
    return pq.read_table(sorted(str(f) for f in folder.glob("*.parquet")))


class DpoTask(Task):
    name = "dpo"
    shuffle_rows = False  # its stream comes shuffled, then grouped by length (length_groups)
    metrics = ("accuracy", "margin", "chosen_logp", "rejected_logp")

    def __init__(self, source: str, pad_id: int, settings: DPOConfig):
        self.source, self.pad_id, self.settings = source, pad_id, settings

    def build_model(self, cfg: Config, train_cfg: DPOConfig) -> torch.nn.Module:
        # No dropout (LoRA's included; the trainer keeps the model in train mode): the policy's log-probs are then the
        # reference's until it learns, and its implicit rewards are not noise.
        model = apply_lora(load_model(self.source, cfg.model.dtype), train_cfg.lora)
        zero_dropout(model)
        return model

    def loss(self, model, batch):
        """preference_loss, a weighted mean over the pairs (each ranked set's prompt counts once, as in the reward
        model); metrics: the implicit reward's accuracy and margin, and the policy's mean log-prob per token of the
        chosen and of the rejected replies (per token: comparable from batch to batch; both falling is DPO's known
        failure)."""
        n = len(batch["chosen_ids"])
        lens = torch.cat([batch["chosen_reply_len"], batch["rejected_reply_len"]])
        logp = reply_logprobs(model, torch.cat([batch["chosen_ids"], batch["rejected_ids"]]), lens, self.pad_id)
        reference = None if self.settings.loss == "simpo" else (batch["ref_chosen_logp"], batch["ref_rejected_logp"])
        losses, chosen, rejected = preference_loss((logp[:n], logp[n:]), reference, (lens[:n], lens[n:]), self.settings)
        weight = batch["weight"]
        margin = (chosen - rejected).detach()
        tokens = int((batch["chosen_ids"] != self.pad_id).sum() + (batch["rejected_ids"] != self.pad_id).sum())
        per_token = (logp / lens).detach()
        return (weight * losses).sum() / weight.sum(), {
            "accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "chosen_logp": float(per_token[:n].mean()), "rejected_logp": float(per_token[n:].mean())}, tokens

    def export(self, model: torch.nn.Module, cfg: Config, out: Path) -> None:
        export_hf(model, cfg, out, adapter_dir=out.parent / "adapter")


def policy_logprobs(model_dir: str, pairs: dict[str, np.ndarray], pad_id: int, dtype: str, bf16: bool | None,
                    batch_size: int) -> np.ndarray:
    """pair_logprobs under the exported model; run_dpo_stage runs it as Ray tasks on the stage's worker resources."""
    model, device = scoring_model(model_dir, dtype, bf16)
    return pair_logprobs(model, pairs, pad_id, device, batch_size)


def held_out_accuracy(policy: np.ndarray, held_out: dict[str, np.ndarray], settings: DPOConfig) -> dict:
    """Per source and overall, on the held-out pairs: the implicit reward's accuracy (the chosen reply's reward
    higher) and mean margin, the mean change of each reply's summed log-prob from the SFT model's, and the baseline of
    the SFT model's own preference (the chosen reply more likely per token; ties half)."""
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    reference = np.stack([held_out["ref_chosen_logp"], held_out["ref_rejected_logp"]], axis=1)
    lens = np.stack([held_out["chosen_reply_len"], held_out["rejected_reply_len"]], axis=1)
    _, chosen, rejected = preference_loss((as_tensor(policy[:, 0]), as_tensor(policy[:, 1])),
                                          (as_tensor(reference[:, 0]), as_tensor(reference[:, 1])),
                                          (as_tensor(lens[:, 0]), as_tensor(lens[:, 1])), settings)
    per_token = reference / lens
    columns = {"accuracy": (chosen > rejected).numpy().astype(float), "margin": (chosen - rejected).numpy(),
               "chosen_logp_change": policy[:, 0] - reference[:, 0],
               "rejected_logp_change": policy[:, 1] - reference[:, 1],
               "sft_likelihood": (np.sign(per_token[:, 0] - per_token[:, 1]) + 1) / 2}
    sources = held_out["source"]
    return {"overall": float(columns["accuracy"].mean()), "pairs": len(sources), "loss": settings.loss,
            **{k: float(v.mean()) for k, v in columns.items() if k != "accuracy"},
            "per_source": {s: {**{k: float(v[sources == s].mean()) for k, v in columns.items()},
                               "pairs": int((sources == s).sum())} for s in sorted(set(sources))}}


def accuracy_table(accuracy: dict, trained_on: Counter) -> list[str]:
    lines = ["# DPO: the implicit reward on the held-out pairs", "",
             f"Loss `{accuracy['loss']}`. The implicit reward of a reply is what the policy's log-prob gained over the "
             "SFT model's (simpo: the policy's mean log-prob), times beta; accuracy: the chosen reply's is higher. "
             "The log-prob changes are of each reply's summed log-prob (both falling: the policy moved away from the "
             "chosen replies too). Baseline: the SFT model prefers the reply it finds more likely per token.", "",
             "| source | trained on | held-out pairs | accuracy | margin | chosen log-prob change | "
             "rejected log-prob change | SFT likelihood baseline |", "|---|---|---|---|---|---|---|---|"]
    row = "| {} | {} | {} | {} | {:.3f} | {:.2f} | {:.2f} | {:.3f} |"
    lines += [row.format(s, trained_on.get(s, 0), v["pairs"], f"{v['accuracy']:.3f}", v["margin"],
                         v["chosen_logp_change"], v["rejected_logp_change"], v["sft_likelihood"])
              for s, v in accuracy["per_source"].items()]
    lines.append(row.format("**overall**", sum(trained_on.values()), accuracy["pairs"],
                            f"**{accuracy['overall']:.3f}**", accuracy["margin"], accuracy["chosen_logp_change"],
                            accuracy["rejected_logp_change"], accuracy["sft_likelihood"]))
    return lines


def run_dpo_stage(cfg: Config, source: str, argv: list[str]) -> dict:
    """Train the DPO policy from the SFT model at `source` on the pairs (cfg.dpo: its half and shares, as the reward
    model's), measure the implicit reward on the held-out pairs, and write accuracy.json/md, summary.json and the
    run's lineage."""
    from .lineage import record_stage
    from .reward_model import pair_table
    from .tokenizer import load_tokenizer
    from .trainer import fit, steps_for, summarize_history

    settings, started, out = cfg.dpo, time.time(), cfg.stage_dir("dpo")
    pad_id = load_tokenizer(cfg.model_path).pad_token_id
    pairs = read_pairs(pair_table(cfg))
    train = training_pairs(pairs, settings)
    trained_on = Counter(train.column("source").to_pylist())
    selected = pa.concat_tables([train, pairs.filter(pc.equal(pairs["split"], "test"))])
    if settings.loss != "simpo":
        selected = with_reference(cfg, settings, source, selected, pad_id)
    held_out = padded(selected.filter(pc.equal(selected["split"], "test")), pad_id, cfg.seq.max_len)
    sample = np.random.default_rng(settings.seed).permutation(len(held_out["source"]))[:settings.eval_rows]
    eval_rows = {k: v[sample] for k, v in held_out.items() if k != "source"}
    numeric = [c for c in selected.column_names if c not in ("prompt", "chosen", "rejected", "split", "group")]
    stream = ray.data.from_arrow(selected.filter(pc.equal(selected["split"], "train")).select(numeric)).random_shuffle(
        seed=settings.seed).map_batches(length_groups, batch_size=settings.micro_batch * 32, batch_format="pyarrow",
                                        fn_kwargs={"micro_batch": settings.micro_batch, "pad_id": pad_id,
                                                   "max_len": cfg.seq.max_len})
    result = fit(cfg, DpoTask(source, pad_id, settings), settings, stream, steps_for(settings, train.num_rows),
                 eval_rows)
    if result.error:
        raise SystemExit(f"[dpo] training failed: {result.error}")

    # Each task scores every num_workers-th held-out pair by length (as much work each), on a worker's resources.
    shards = length_balanced_shards(held_out, pad_id, settings.num_workers)
    task = ray.remote(policy_logprobs).options(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker)
    scored = ray.get([task.remote(str(out / "final"), {k: v[rows] for k, v in held_out.items() if k != "source"},
                                  pad_id, cfg.model.dtype, settings.bf16, settings.micro_batch) for rows in shards])
    policy = np.empty((len(held_out["chosen_ids"]), 2))
    policy[np.concatenate(shards)] = np.concatenate(scored)
    if settings.loss == "simpo":  # no reference pass: the SFT model's log-probs for the report, on the held-out pairs
        reference = ray.get(task.remote(source, held_out, pad_id, cfg.model.dtype, settings.bf16, settings.micro_batch))
        held_out["ref_chosen_logp"], held_out["ref_rejected_logp"] = reference[:, 0], reference[:, 1]
    accuracy = held_out_accuracy(policy, held_out, settings)
    for name, row in accuracy["per_source"].items():
        row["train_pairs"] = trained_on.get(name, 0)
    (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2, ensure_ascii=False))
    table = accuracy_table(accuracy, trained_on)
    (out / "accuracy.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    summary = {**summarize_history(out / "history.jsonl"), "accuracy": accuracy["overall"], "model": str(out / "final")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    record_stage(cfg, "dpo", argv, started, summary)
    return summary
