"""Is our RL step faster than TRL's? Runs our PPO job (Ray actor roles: vLLM rollout, reference, reward,
DeepSpeed ZeRO-2 learners) and then TRL's trainer in this process, from the same SFT policy (LoRA as in
cfg.ppo), reward model, prompt set, samples per prompt, response length, minibatch, epochs, learning
rate and number of threads, and prints samples/s of each, the ratio (target: ours >= 2.5x the faster TRL
baseline that runs), our time breakdown (target: weight sync under 5% of the step) and our generation's share of
the machine's decoding limit (bench/limits.py).

    .venv/bin/python bench/ppo_step.py [--steps 10] [--warmup 2] [preset=tiny key=value ...]

TRL 1.16 (the version this project pins) no longer ships a PPO trainer: its online RL trainers are
GRPOTrainer and RLOOTrainer. The baseline is therefore TRL's GRPOTrainer against our same loop with the
same estimator (ppo.advantage=grpo: no critic); our PPO with the critic (gae) is measured too, as
information. TRL runs twice: with its transformers generation, and with vLLM in its own process (use_vllm,
vllm_mode="colocate", the vLLM build this project installs); a baseline that cannot run here is reported with its
error, and the headline ratio is against the faster one that ran. A "step" is one batch of experience:
prompts_per_step x samples_per_prompt responses, trained for ppo.epochs epochs of minibatches (TRL:
steps_per_generation x num_iterations optimizer steps). Samples/s = responses generated and trained on per second,
over the steps after the warm-up.
Results: runs/<preset>/bench/ppo_step.{json,md}; our runs go to temporary run folders.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from clinicalgpt.config import Config, load_config
from clinicalgpt.corpus import read_records
from clinicalgpt.modeling import load_model
from clinicalgpt.runtime import init_ray
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids
from limits import decode_bytes, decode_limit, read_bandwidth

REPO = Path(__file__).resolve().parent.parent
TARGET = 2.5  # against the faster TRL baseline that runs here
TIMINGS = ("generate_s", "score_s", "train_s", "sync_s")


def measure_ours(cfg: Config, overrides: list[str], advantage: str, warmup: int, steps: int) -> dict:
    """`python jobs/ppo.py` on this Ray cluster for warmup + steps steps, in a temporary run folder that
    shares the data and models."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy.deepcopy(cfg)
        run.run_root = tmp
        for name in ("data", "base", "sft", "rm"):
            (run.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run.run_dir / name).symlink_to(cfg.run_dir / name)
        total = warmup + steps
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        subprocess.run([sys.executable, str(REPO / "jobs" / "ppo.py"), *overrides, f"run_root={tmp}",
                        f"data.root={cfg.data_root}", f"ppo.steps={total}", f"ppo.advantage={advantage}",
                        f"ppo.eval_every={total}", f"ppo.checkpoint_every={total}", "ppo.eval_prompts=4"],
                       env=env, check=True)
        rows = [json.loads(x) for x in (run.stage_dir("ppo") / "history.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup and "reward" in r]
    seconds = sum(r["step_s"] for r in timed)
    samples = len(timed) * cfg.ppo.prompts_per_step * cfg.ppo.samples_per_prompt
    breakdown = {k: float(np.mean([r[k] for r in timed])) for k in TIMINGS + ("step_s",)}
    per_step = cfg.ppo.prompts_per_step * cfg.ppo.samples_per_prompt
    generated = float(np.mean([per_step * r["response_length"] / r["generate_s"] for r in timed]))
    return {"system": f"ours (Ray roles, vLLM, ZeRO-2), {advantage}", "steps": len(timed), "samples": samples,
            "seconds": round(seconds, 2), "samples_per_s": samples / seconds, "breakdown": breakdown,
            "response_length": float(np.mean([r["response_length"] for r in timed])),
            "generated_tokens_per_s": generated}


class StepClock(TrainerCallback):
    def __init__(self):
        self.marks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())


def prompt_chats(cfg: Config, n: int) -> list[list[dict]]:
    """The first n PPO prompts (the rl split) that fit ppo.max_prompt_len, as chats without the reply."""
    tok = load_tokenizer(cfg.model_path, cfg.model.chat_template)
    chats = []
    for batch in read_records(cfg, ["rl"], list(cfg.ppo.prompt_tasks)).iter_batches(batch_size=256):
        for messages in batch["messages"]:
            chat = [{"role": m["role"], "content": m["content"]} for m in messages]
            chat = chat[:-1] if chat[-1]["role"] == "assistant" else chat
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            if len(tok(text, add_special_tokens=False)["input_ids"]) <= cfg.ppo.max_prompt_len:
                chats.append(chat)
            if len(chats) == n:
                return chats
    return chats


def measure_trl(cfg: Config, chats: list[list[dict]], warmup: int, steps: int, threads: int, use_vllm: bool) -> dict:
    ppo = cfg.ppo
    per_step = ppo.prompts_per_step * ppo.samples_per_prompt
    optimizer_steps = per_step // ppo.minibatch  # per epoch, as ours
    policy = str(cfg.stage_dir("sft") / "final")
    clock = StepClock()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=ppo.minibatch, steps_per_generation=optimizer_steps,
            num_iterations=ppo.epochs, num_generations=ppo.samples_per_prompt, max_completion_length=ppo.max_new_tokens,
            temperature=ppo.temperature, top_p=ppo.top_p, beta=ppo.kl_coef, epsilon=ppo.clip, learning_rate=ppo.lr,
            max_grad_norm=ppo.grad_clip, max_steps=(warmup + steps) * optimizer_steps * ppo.epochs, seed=ppo.seed,
            use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
            logging_steps=10**6, disable_tqdm=True, use_vllm=use_vllm, vllm_mode="colocate",
            vllm_max_model_length=cfg.seq.max_len)
        trainer = GRPOTrainer(
            model=load_model(policy, cfg.model.dtype), reward_funcs=str(cfg.stage_dir("rm") / "final"), args=args,
            train_dataset=Dataset.from_list([{"prompt": c} for c in chats]),
            processing_class=load_tokenizer(policy, cfg.model.chat_template), callbacks=[clock],
            peft_config=LoraConfig(r=ppo.lora.r, lora_alpha=ppo.lora.alpha, lora_dropout=ppo.lora.dropout,
                                   target_modules=list(ppo.lora.targets), task_type="CAUSAL_LM"))
        trainer.train()
    per_round = optimizer_steps * ppo.epochs
    ends = clock.marks[per_round - 1::per_round]  # the end of each batch of experience
    seconds = ends[-1] - ends[warmup - 1]
    samples = (len(ends) - warmup) * per_step
    return {"system": trl_name(use_vllm), "steps": len(ends) - warmup, "samples": samples, "seconds": round(seconds, 2),
            "samples_per_s": samples / seconds}


def trl_name(use_vllm: bool) -> str:
    return f"TRL {trl.__version__} GRPOTrainer ({'vLLM, colocate' if use_vllm else 'transformers generation'})"


def measure_trl_or_error(*args, use_vllm: bool) -> dict:
    """measure_trl, or the row of a baseline that cannot run here, with its error."""
    try:
        return measure_trl(*args, use_vllm=use_vllm)
    except Exception as e:  # a baseline that fails here is a result to report
        print(f"[bench] {trl_name(use_vllm)} cannot run here: {type(e).__name__}: {e}", flush=True)
        return {"system": trl_name(use_vllm), "error": f"{type(e).__name__}: {str(e)[:300]}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="measured steps (batches of experience) per system")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (>= 1)")
    ap.add_argument("overrides", nargs="*", help="config key=value (preset=..., ppo.max_new_tokens=...)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    cfg = load_config(args.overrides)
    ppo = cfg.ppo
    for stage in ("sft", "rm"):
        if not (cfg.stage_dir(stage) / "final" / "config.json").exists():
            raise SystemExit(f"no {stage} model under {cfg.run_dir}: run scripts/recipe.sh first")
    threads = os.cpu_count() or 1  # ours spreads its roles over every core; TRL gets them all

    os.environ.pop("RAY_ADDRESS", None)  # a local cluster on this machine: both systems on the same cores
    init_ray(cfg)
    chats = prompt_chats(cfg, (args.warmup + args.steps) * ppo.prompts_per_step * 2)
    rows = [measure_ours(cfg, args.overrides, a, args.warmup, args.steps) for a in ("grpo", "gae")]
    ray.shutdown()  # nothing of Ray left competing for the cores while TRL runs
    trl_rows = [measure_trl_or_error(cfg, chats, args.warmup, args.steps, threads, use_vllm=v) for v in (False, True)]
    rows += trl_rows
    best = max((r for r in trl_rows if "error" not in r), key=lambda r: r["samples_per_s"])
    ratio = rows[0]["samples_per_s"] / best["samples_per_s"]
    ours = rows[0]["breakdown"]
    sync_share = ours["sync_s"] / ours["step_s"]
    # Our generation phase against this machine's decoding limit (bench/limits.py), measured now the cores are free.
    weights, kv = decode_bytes(str(cfg.stage_dir("sft") / "final"), cfg.model.dtype)
    tok = load_tokenizer(cfg.model_path, cfg.model.chat_template)
    prompt, bandwidth = np.mean([len(prompt_ids(tok, c)) for c in chats]), read_bandwidth(threads)
    decoding = decode_limit(weights, kv, ppo.prompts_per_step * ppo.samples_per_prompt,
                            prompt + rows[0]["response_length"] / 2, bandwidth)
    setup = (f"RL step throughput, preset {cfg.preset}: {ppo.prompts_per_step} prompts x {ppo.samples_per_prompt} "
             f"samples per step, up to {ppo.max_new_tokens} new tokens, minibatch {ppo.minibatch}, "
             f"{ppo.epochs} epochs, "
             f"LoRA r={ppo.lora.r}, {threads} cores, {args.warmup} warm-up steps excluded; torch {torch.__version__}")
    lines = [setup, "", "| system | steps | samples/s | s/step |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['steps']} | {r['samples_per_s']:.2f} | {r['seconds'] / r['steps']:.2f} |"
              if "error" not in r else f"| {r['system']} | cannot run here: {r['error']} | | |" for r in rows]
    lines += ["", f"ratio ours/{best['system']} (same estimator, grpo) = {ratio:.2f}x (target >= {TARGET}x)",
              "our step, grpo: " + ", ".join(f"{k[:-2]} {ours[k]:.2f}s" for k in TIMINGS)
              + f" of {ours['step_s']:.2f}s; weight sync {sync_share:.1%} of the step (target < 5%)",
              f"our generation, grpo: {rows[0]['generated_tokens_per_s']:,.0f} tok/s, "
              f"{rows[0]['generated_tokens_per_s'] / decoding:.1%} of the decoding limit, {decoding:,.0f} tok/s "
              f"(weights {weights / 1e6:.1f} MB and keys and values {kv / 1e3:.1f} KB a token read at "
              f"{bandwidth / 1e9:.1f} GB/s; {ppo.prompts_per_step * ppo.samples_per_prompt} sequences of "
              f"{prompt:.0f} prompt and {rows[0]['response_length']:.0f} response tokens on average)"]
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    out = cfg.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo_step.json").write_text(json.dumps(
        {"setup": setup, "rows": rows, "ratio": ratio, "target": TARGET, "meets_target": ratio >= TARGET,
         "sync_share": sync_share, "decoding_limit_tokens_per_s": decoding}, indent=2))
    (out / "ppo_step.md").write_text(md)
    print(f"results -> {out}/ppo_step.{{json,md}}")


if __name__ == "__main__":
    main()
