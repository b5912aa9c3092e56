"""Is our SFT step faster than TRL's? Runs our real SFT stage (Ray Train + DeepSpeed ZeRO-2, packed rows,
LoRA as in cfg.sft) and then TRL's SFTTrainer in this process, from the same model, on the same records,
sequence length, batch, LoRA, learning rate and number of threads, and prints the tokens/s of each and
the ratios (targets: ours >= 1.5x TRL's defaults, from packing instead of padding, and >= 2.5x TRL with its
own packing).

    .venv/bin/python bench/sft_throughput.py [--steps 30] [--warmup 3] [--records 4000] [--source DIR]
        [--no-trl-packing] [preset=tiny key=value ...]

Tokens are counted alike on both sides: the non-padding tokens processed (prompt and response), over the
optimizer steps after the warm-up ones. Ours streams its data (tokenize and pack on Ray Data, on the same
cores) while it trains; TRL tokenizes its sample before training, outside the timed steps. TRL runs with
its defaults except where they would measure something else than padding: no gradient checkpointing and
no bf16 autocast (ours uses neither). A second TRL row uses its own packing (packing=True: best-fit
decreasing, padding-free) when --trl-packing is on; the headline ratio is against TRL's defaults.
Each row also gives its achieved matrix-multiply FLOP/s and their share of this machine's peak on the model's own
matrix multiplies (bench/limits.py), measured in the same run with the same threads.
Results: runs/<preset>/bench/sft_throughput.{json,md}; our run goes to a temporary run folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from clinicalgpt.config import Config, load_config
from clinicalgpt.corpus import read_records
from clinicalgpt.modeling import apply_lora, load_model
from clinicalgpt.packing import keep_sampled, tokenize_chats
from clinicalgpt.runtime import init_ray, resolve_bf16
from clinicalgpt.stages import CORPUS_TASKS, run_causal_stage
from clinicalgpt.tokenizer import CHATML_TEMPLATE, load_tokenizer
from limits import learner_limit, limit_columns

TARGET = 1.5  # against TRL's defaults (padded)
TARGET_PACKING = 2.5  # against TRL with packing=True

# Our ChatML template with TRL's {% generation %} markers around each assistant turn and its end-of-turn,
# which is where our labels are (packing.assistant_spans). It renders the same text; TRL's
# assistant_only_loss needs the markers and only knows how to add them to the templates it ships.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sample_chats(cfg: Config, n: int, tokenizer) -> tuple[list[list[dict]], list[list[int]]]:
    """A fixed random sample of our SFT train records (same tasks and task_fractions as the stage) that fit
    in one sequence, as ours skips longer ones; with our response-only labels, to check TRL's against."""
    records = read_records(cfg, ["train"], CORPUS_TASKS).map_batches(
        keep_sampled, batch_format="pyarrow", fn_kwargs={"fractions": dict(cfg.sft.task_fractions), "seed": cfg.data.seed})
    table = pa.concat_tables(ray.get(records.to_arrow_refs()))
    picked = np.random.default_rng(cfg.data.seed).choice(table.num_rows, min(n, table.num_rows), replace=False)
    chats = [[{"role": m["role"], "content": m["content"]} for m in msgs]
             for msgs in table.take(picked).column("messages").to_pylist()]
    samples = tokenize_chats(tokenizer, chats)
    fits = [i for i, (ids, _) in enumerate(samples) if len(ids) <= cfg.seq.max_len]
    return [chats[i] for i in fits], [samples[i][1] for i in fits]


def measure_ours(cfg: Config, source: str, warmup: int, steps: int) -> dict:
    """Our SFT stage for warmup + steps optimizer steps in a temporary run folder that shares the built
    data and base model (so the real sft outputs stay untouched)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy.deepcopy(cfg)
        run.run_root = tmp
        run.run_dir.mkdir(parents=True)
        for name in ("data", "base"):
            (run.run_dir / name).symlink_to(cfg.run_dir / name)
        total = warmup + steps
        # Eval (steps 1 and last) and checkpoints are outside the timed step_seconds; keep them few and small.
        sft = run.sft
        sft.max_steps, sft.eval_every, sft.checkpoint_every, sft.eval_rows = total, total, total, sft.micro_batch
        run_causal_stage(run, "sft", sft, source, argv=[])  # a temporary run: no command to record
        history = [json.loads(x) for x in (run.stage_dir("sft") / "history.jsonl").read_text().splitlines()]
    if [r["step"] for r in history] != list(range(1, total + 1)):
        raise SystemExit(f"our run restarted mid-way (steps {[r['step'] for r in history]}); run the bench again")
    return result_row("ours (Ray Train + DeepSpeed, packed)", steps, sum(r["tokens"] for r in history[warmup:]),
                      sum(r["step_seconds"] for r in history[warmup:]))


class StepClock(TrainerCallback):
    """Time and non-padding tokens seen (include_num_input_tokens_seen) at the end of each optimizer step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def measure_trl(cfg: Config, source: str, chats: list[list[dict]], labels: list[list[int]], warmup: int,
                steps: int, packing: bool) -> dict:
    sft = cfg.sft
    tokenizer = load_tokenizer(source, cfg.model.chat_template)
    if tokenizer.chat_template == CHATML_TEMPLATE:
        tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=warmup + steps, learning_rate=sft.lr, seed=sft.seed,
            per_device_train_batch_size=sft.micro_batch,
            gradient_accumulation_steps=max(1, sft.global_batch // sft.micro_batch),  # same sequences per step
            max_length=cfg.seq.max_len, assistant_only_loss=True, packing=packing,
            gradient_checkpointing=False, bf16=resolve_bf16(sft.bf16),  # TRL defaults True for both; ours as its workers resolve it
            use_cpu=not torch.cuda.is_available(),  # transformers' Trainer takes bf16 on a CPU only when told
            include_num_input_tokens_seen="non_padding", save_strategy="no", report_to="none", disable_tqdm=True)
        trainer = SFTTrainer(model=apply_lora(load_model(source, cfg.model.dtype), sft.lora), args=args,
                             train_dataset=Dataset.from_list([{"messages": c} for c in chats]),
                             processing_class=tokenizer, callbacks=[clock])
        if not packing and trainer.train_dataset["labels"] != labels:
            raise SystemExit("TRL's response-only labels differ from ours (packing.tokenize_chats)")
        trainer.train()
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    name = "TRL SFTTrainer, packing=True" if packing else "TRL SFTTrainer, defaults (padded)"
    return result_row(name, len(clock.marks) - warmup, n1 - n0, t1 - t0)


def result_row(system: str, steps: int, tokens: float, seconds: float) -> dict:
    return {"system": system, "steps": steps, "tokens": int(round(tokens)), "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / steps, "tokens_per_step": tokens / steps}


def markdown(rows: list[dict], ratios: list[str], setup: str) -> str:
    lines = [setup, "", "| system | steps | tokens/s | s/step | tokens/step | GFLOP/s | of the matmul peak |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.3f} | "
              f"{r['tokens_per_step']:,.0f} | {r['gflops']:.1f} | {r['of_peak']:.0%} |" for r in rows]
    return "\n".join(lines + [""] + ratios) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="measured optimizer steps per system")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps run first and not measured (>= 1)")
    ap.add_argument("--records", type=int, default=4000, help="records sampled for TRL")
    ap.add_argument("--source", default="", help="starting model (default: runs/<preset>/pretrain/final)")
    ap.add_argument("--trl-packing", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure TRL with packing=True")
    ap.add_argument("overrides", nargs="*", help="config key=value (preset=..., sft.micro_batch=...)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    cfg = load_config(args.overrides)
    source = args.source or str(cfg.stage_dir("pretrain") / "final")
    sft = cfg.sft
    # Ray gives each fractional-CPU training worker OMP_NUM_THREADS=max(1, floor(cpus)) threads; TRL gets the sum.
    threads = sft.num_workers * max(1, int(sft.cpus_per_worker))

    os.environ.pop("RAY_ADDRESS", None)  # a local cluster on this machine: both systems on the same cores
    init_ray(cfg)
    chats, labels = sample_chats(cfg, args.records, load_tokenizer(source, cfg.model.chat_template))
    if len(chats) < (args.warmup + args.steps) * sft.global_batch:
        raise SystemExit(f"{len(chats)} records are fewer than TRL's steps need; raise --records")
    rows = [measure_ours(cfg, source, args.warmup, args.steps)]
    ray.shutdown()  # nothing of Ray left competing for the cores while TRL runs

    torch.set_num_threads(threads)
    rows.append(measure_trl(cfg, source, chats, labels, args.warmup, args.steps, packing=False))
    if args.trl_packing:
        rows.append(measure_trl(cfg, source, chats, labels, args.warmup, args.steps, packing=True))
    bf16 = resolve_bf16(sft.bf16)
    limit = learner_limit(apply_lora(load_model(source, cfg.model.dtype), sft.lora).train(), sft.micro_batch,
                          cfg.seq.max_len, bf16, threads)
    rows = [{**r, **limit_columns(r["tokens_per_s"], limit)} for r in rows]

    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    ratios = [f"ratio ours/TRL = {ratio:.2f}x (target >= {TARGET}x)"]
    if args.trl_packing:
        ratios.append(f"ratio ours/TRL packing=True = {rows[0]['tokens_per_s'] / rows[2]['tokens_per_s']:.2f}x "
                      f"(target >= {TARGET_PACKING}x)")
    setup = (f"SFT throughput, preset {cfg.preset}, model {source}: seq {cfg.seq.max_len}, micro batch "
             f"{sft.micro_batch}, {sft.global_batch} sequences per step, LoRA r={sft.lora.r} "
             f"(enabled={sft.lora.enabled}), {threads} threads, {args.warmup} warm-up steps excluded; "
             f"TRL {trl.__version__} on {len(chats)} sampled records, torch {torch.__version__}, "
             f"{os.cpu_count()} cores; {'bf16' if bf16 else cfg.model.dtype} matrix multiplies: "
             f"{limit['flops_per_token'] / 1e6:.1f} MFLOP per token, peak {limit['peak_flops'] / 1e9:.1f} GFLOP/s")
    md = markdown(rows, ratios, setup)
    print("\n" + md)
    out = cfg.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_throughput.json").write_text(json.dumps(
        {"setup": setup, "source": source, "seq_len": cfg.seq.max_len, "micro_batch": sft.micro_batch,
         "global_batch": sft.global_batch, "threads": threads, "warmup_steps": args.warmup, "trl_records": len(chats),
         "limit": limit, "rows": rows, "ratio": ratio, "target": TARGET, "meets_target": ratio >= TARGET}, indent=2))
    (out / "sft_throughput.md").write_text(md)
    print(f"results -> {out}/sft_throughput.{{json,md}}")


if __name__ == "__main__":
    main()
