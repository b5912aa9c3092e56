"""Is our DPO faster than TRL's? Runs our DPO stage (Ray Train + DeepSpeed ZeRO-2, the reference log-probs from a
Ray Data pass, pairs grouped by length) and then TRL's DPOTrainer at its best (precompute_ref_log_probs=True: no
reference model beside the policy) in this process, from the same SFT model, on the same training and held-out pairs,
with the same loss, beta, sequence length, batch, LoRA, learning rate, precision and number of threads; prints the
tokens/s of each, the ratio (target: ours >= 1.5x) and the time split (reference pass, training).

    .venv/bin/python bench/dpo_throughput.py [--steps 30] [--warmup 3] [--source DIR] [preset=tiny key=value ...]

Tokens are counted alike: the non-padding tokens of the chosen and rejected sequences processed, over the optimizer
steps after the warm-up ones (TRL: include_num_input_tokens_seen). Both sides train on the same pairs: a share of
every source's training pairs of the reward model's half, as many as the steps take, and both compute the reference
log-probs of those and of the held-out pairs (TRL: as its eval dataset). Ours also scores the held-out pairs after
training (its per-source report), outside the measured steps and shown apart.
Results: runs/<preset>/bench/dpo_throughput.{json,md}; our run goes to a temporary run folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import pyarrow.compute as pc
import ray
import torch
import trl
from datasets import Dataset
from sft_throughput import StepClock, markdown, result_row
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from clinicalgpt.config import Config, load_config
from clinicalgpt.dpo import run_dpo_stage
from clinicalgpt.modeling import apply_lora, load_model
from clinicalgpt.reward_model import read_pairs, training_pairs
from clinicalgpt.runtime import init_ray, resolve_bf16
from clinicalgpt.tokenizer import load_tokenizer

TARGET = 1.5


def measure_ours(cfg: Config, source: str, warmup: int, steps: int) -> tuple[dict, dict]:
    """Our DPO stage for warmup + steps optimizer steps in a temporary run folder that shares the built data and the
    SFT model: (the measured row, the time split)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy.deepcopy(cfg)
        run.run_root = tmp
        run.run_dir.mkdir(parents=True)
        for name in ("data", "base", "sft"):
            (run.run_dir / name).symlink_to(cfg.run_dir / name)
        total = warmup + steps
        # Held-out evaluation (steps 1 and last) and checkpoints are outside the timed step_seconds; few and small.
        dpo = run.dpo
        dpo.max_steps, dpo.eval_every, dpo.checkpoint_every, dpo.eval_rows = total, total, total, dpo.micro_batch
        started = time.time()
        run_dpo_stage(run, source, argv=[])  # a temporary run: no command to record
        wall = time.time() - started
        history = [json.loads(x) for x in (run.stage_dir("dpo") / "history.jsonl").read_text().splitlines()]
        reference = json.loads((run.stage_dir("dpo") / "reference" / "stream.json").read_text())
    if [r["step"] for r in history] != list(range(1, total + 1)):
        raise SystemExit(f"our run restarted mid-way (steps {[r['step'] for r in history]}); run the bench again")
    row = result_row("ours (Ray Train + DeepSpeed, Ray Data reference pass)", steps,
                     sum(r["tokens"] for r in history[warmup:]), sum(r["step_seconds"] for r in history[warmup:]))
    return row, {"reference_pairs": reference["pairs"], "reference_seconds": reference["seconds"],
                 "training_seconds": sum(r["step_seconds"] for r in history), "stage_seconds": round(wall, 1)}


class TimedDPOTrainer(DPOTrainer):
    """DPOTrainer that times its reference pass (_precompute_ref_logps, run for the train and eval datasets)."""

    reference_seconds = 0.0

    def _precompute_ref_logps(self, *args, **kwargs):
        started = time.time()
        out = super()._precompute_ref_logps(*args, **kwargs)
        self.reference_seconds += time.time() - started
        return out


def as_conversations(pairs) -> Dataset:
    """Pairs in TRL's conversational preference format, so that it renders them with the same chat template."""
    columns = (pairs.column(k).to_pylist() for k in ("prompt", "chosen", "rejected"))
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "chosen": [{"role": "assistant", "content": c}],
                               "rejected": [{"role": "assistant", "content": r}]} for p, c, r in zip(*columns)])


def measure_trl(cfg: Config, source: str, train, held_out, warmup: int, steps: int) -> tuple[dict, dict]:
    dpo = cfg.dpo
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLDPOConfig(
            output_dir=tmp, max_steps=warmup + steps, learning_rate=dpo.lr, seed=dpo.seed, beta=dpo.beta,
            loss_type=[dpo.loss], label_smoothing=dpo.label_smoothing, max_length=cfg.seq.max_len,
            per_device_train_batch_size=dpo.micro_batch, per_device_eval_batch_size=dpo.micro_batch,
            gradient_accumulation_steps=max(1, dpo.global_batch // dpo.micro_batch),  # same pairs per step
            precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=resolve_bf16(dpo.bf16),
            use_cpu=not torch.cuda.is_available(),  # transformers' Trainer takes bf16 on a CPU only when told
            include_num_input_tokens_seen="non_padding", eval_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True)
        started = time.time()
        trainer = TimedDPOTrainer(model=apply_lora(load_model(source, cfg.model.dtype), dpo.lora), args=args,
                                  train_dataset=as_conversations(train), eval_dataset=as_conversations(held_out),
                                  processing_class=load_tokenizer(source, cfg.model.chat_template), callbacks=[clock])
        set_up = time.time() - started
        trainer.train()
        wall = time.time() - started
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    row = result_row("TRL DPOTrainer, precomputed reference log-probs", len(clock.marks) - warmup, n1 - n0, t1 - t0)
    return row, {"reference_pairs": len(trainer.train_dataset) + len(trainer.eval_dataset),  # what TRL kept of them
                 "reference_seconds": round(trainer.reference_seconds, 1),
                 "set_up_seconds": round(set_up, 1), "training_seconds": round(wall - set_up, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="measured optimizer steps per system")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps run first and not measured (>= 1)")
    ap.add_argument("--source", default="", help="the SFT model (default: runs/<preset>/sft/final)")
    ap.add_argument("overrides", nargs="*", help="config key=value (preset=..., dpo.micro_batch=...)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    cfg = load_config(args.overrides)
    source = args.source or str(cfg.stage_dir("sft") / "final")
    dpo = cfg.dpo
    # Ray gives each fractional-CPU training worker OMP_NUM_THREADS=max(1, floor(cpus)) threads; TRL gets the sum.
    threads = dpo.num_workers * max(1, int(dpo.cpus_per_worker))

    # The same share of every source's training pairs on both sides: as many as the steps take.
    pairs = read_pairs(cfg.data_dir / "pairs")
    available = training_pairs(pairs, dpo)
    share = min(1.0, 1.1 * (args.warmup + args.steps) * dpo.global_batch / available.num_rows)
    sources = set(available.column("source").to_pylist())
    dpo.pair_fractions = {s: share * dpo.pair_fractions.get(s, 1.0) for s in sources}
    train, held_out = training_pairs(pairs, dpo), pairs.filter(pc.equal(pairs["split"], "test"))

    os.environ.pop("RAY_ADDRESS", None)  # a local cluster on this machine: both systems on the same cores
    init_ray(cfg)
    ours, ours_split = measure_ours(cfg, source, args.warmup, args.steps)
    ray.shutdown()  # nothing of Ray left competing for the cores while TRL runs

    torch.set_num_threads(threads)
    theirs, trl_split = measure_trl(cfg, source, train, held_out, args.warmup, args.steps)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    reference_ratio = ((ours_split["reference_pairs"] / ours_split["reference_seconds"])
                       / (trl_split["reference_pairs"] / trl_split["reference_seconds"]))
    lines = [f"ratio ours/TRL = {ratio:.2f}x tokens/s in the training steps (target >= {TARGET}x)",
             f"reference pass: ours {ours_split['reference_pairs']:,} pairs in "
             f"{ours_split['reference_seconds']:.1f} s, "
             f"TRL {trl_split['reference_pairs']:,} in {trl_split['reference_seconds']:.1f} s "
             f"({reference_ratio:.2f}x pairs/s)",
             f"wall: ours {ours_split['stage_seconds']:.0f} s for the whole stage (start-up, reference pass, "
             f"{args.warmup + args.steps} steps, export, held-out report), TRL {trl_split['set_up_seconds']:.0f} s "
             f"set-up (tokenization, reference pass) + {trl_split['training_seconds']:.0f} s training"]
    setup = (f"DPO throughput, preset {cfg.preset}, model {source}: loss {dpo.loss}, beta {dpo.beta}, seq "
             f"{cfg.seq.max_len}, micro batch {dpo.micro_batch} pairs, {dpo.global_batch} pairs per step, LoRA "
             f"r={dpo.lora.r} (enabled={dpo.lora.enabled}), bf16 {resolve_bf16(dpo.bf16)}, {threads} threads, "
             f"{args.warmup} warm-up steps excluded; {train.num_rows:,} training and {held_out.num_rows:,} held-out "
             f"pairs; TRL {trl.__version__}, torch {torch.__version__}, {os.cpu_count()} cores")
    md = markdown([ours, theirs], lines, setup)
    print("\n" + md)
    out = cfg.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_throughput.json").write_text(json.dumps(
        {"setup": setup, "source": source, "threads": threads, "warmup_steps": args.warmup, "rows": [ours, theirs],
         "split": {"ours": ours_split, "trl": trl_split}, "ratio": ratio, "reference_ratio": reference_ratio,
         "target": TARGET, "meets_target": ratio >= TARGET}, indent=2))
    (out / "dpo_throughput.md").write_text(md)
    print(f"results -> {out}/dpo_throughput.{{json,md}}")


if __name__ == "__main__":
    main()
