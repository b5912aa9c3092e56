"""Do the rollout engines sample the policy the learner trains, in bf16? The engines get the policy with its
LoRA deltas merged into the weights; in bf16 a small delta rounds away, while the learner adds its LoRA path
to the same bf16 base weights, so the engines sample a slightly different policy than the one the PPO ratio
is taken against. Truncated importance sampling (ppo.tis_cap) weights each token's policy loss by
min(pi_learner / pi_engine, cap) to correct for it.

This runs a few PPO steps with the real roles (vLLM rollout engine, reference, reward, DeepSpeed learner) on
the SFT model of a run folder, in float32 (the baseline) and in bfloat16 (model.dtype=bfloat16, ppo.bf16=true),
each with TIS on and off, and reports the engine-learner log-prob gap of the sampled tokens before any weight
push (step 1: both sides load the SFT weights) and after the pushes (the later steps), the TIS weights and
the policy update's approx-KL and clip fraction.

    .venv/bin/python bench/offpolicy_bf16.py [--steps 4] [run_root=... data.root=... key=value ...]

Results: runs/<preset>/bench/offpolicy_bf16.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import ray
import torch

from clinicalgpt.config import load_config
from clinicalgpt.rlhf.prompts import PromptStream
from clinicalgpt.rlhf.roles import start_roles
from clinicalgpt.rlhf.step import ppo_step
from clinicalgpt.rlhf.train import check_inputs
from clinicalgpt.runtime import init_ray

# Small steps as the tests' (tests/conftest.py SMALL_PPO), critic-free and with one learner rank to fit in
# minutes on 2 cores; the high learning rate moves the LoRA weights far enough for bf16 rounding to show.
SETTINGS = ["ppo.prompts_per_step=8", "ppo.samples_per_prompt=4", "ppo.minibatch=16", "ppo.max_new_tokens=24",
            "ppo.reward=length:6", "ppo.lr=2e-3", "ppo.advantage=grpo", "ppo.learner.num=1"]
VARIANTS = [("float32", 2.0), ("float32", 0.0), ("bfloat16", 2.0), ("bfloat16", 0.0)]
MEANS = ("tis_weight", "tis_truncated_tokens", "approx_kl", "clip_fraction", "reward", "step_s")


def run_variant(overrides: list[str], dtype: str, tis_cap: float, prompts: list[list[list[int]]]) -> dict:
    """A PPO step per batch of prompts with the real roles in `dtype`; the gap before and after weight pushes
    and the steps' means."""
    cfg = load_config([*SETTINGS, *overrides, f"model.dtype={dtype}", f"ppo.bf16={dtype == 'bfloat16'}",
                       f"ppo.tis_cap={tis_cap}"])
    policy, reward, critic = check_inputs(cfg)
    started = time.time()
    roles = start_roles(cfg, policy, reward, critic)
    start_s = time.time() - started
    try:
        rows = [ppo_step(cfg, roles, batch, cfg.ppo.kl_coef, step) for step, batch in enumerate(prompts)]
    finally:
        roles.shutdown()
    pushed = rows[1:]  # step 1 samples with the weights both sides loaded; each later step after a push
    return {"dtype": dtype, "tis_cap": tis_cap, "start_s": start_s,
            "gap_before_push": rows[0]["engine_logprob_gap"],
            "gap_after_push": float(np.mean([r["engine_logprob_gap"] for r in pushed])),
            "gap_after_push_max": float(np.max([r["engine_logprob_gap"] for r in pushed])),
            **{k: float(np.mean([r[k] for r in rows])) for k in MEANS if k in rows[0]}, "rows": rows}


def cell(row: dict, key: str, digits: int = 4) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="PPO steps per variant (>= 2: the first has no push before it)")
    ap.add_argument("overrides", nargs="*", help="config key=value (run_root=..., data.root=..., ppo.lr=...)")
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2")
    cfg = load_config([*SETTINGS, *args.overrides])
    ppo = cfg.ppo
    os.environ.pop("RAY_ADDRESS", None)  # a local cluster on this machine
    init_ray(cfg)
    # The same prompts for every variant, read once (the stream's Ray Data tasks would compete with the roles).
    stream = PromptStream(cfg)
    prompts = [stream.take(ppo.prompts_per_step) for _ in range(args.steps)]
    stream.close()
    rows = [run_variant(args.overrides, dtype, cap, prompts) for dtype, cap in VARIANTS]
    ray.shutdown()

    setup = (f"Engine-learner mismatch, preset {cfg.preset}, SFT model {cfg.stage_dir('sft') / 'final'}: "
             f"{args.steps} PPO steps per variant ({ppo.prompts_per_step} prompts x {ppo.samples_per_prompt} samples, "
             f"up to {ppo.max_new_tokens} tokens, {ppo.advantage}, lr {ppo.lr:g}, LoRA r={ppo.lora.r}), "
             f"temperature {ppo.temperature:g}, top_p {ppo.top_p:g}; torch {torch.__version__}, "
             f"avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}")
    lines = [setup, "",
             "| dtype | tis_cap | gap before push | gap after push (mean / max) | TIS weight | truncated tokens "
             "| approx_kl | clip fraction | reward | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['tis_cap']:g} | {r['gap_before_push']:.2e} | {r['gap_after_push']:.2e} / "
              f"{r['gap_after_push_max']:.2e} | {cell(r, 'tis_weight')} | {cell(r, 'tis_truncated_tokens')} | "
              f"{cell(r, 'approx_kl', 5)} | {cell(r, 'clip_fraction')} | {cell(r, 'reward', 3)} | {cell(r, 'step_s', 1)} |"
              for r in rows]
    lines += ["", "gap: mean |engine log-prob - learner log-prob| of the sampled tokens (the learner's before its "
              "update); TIS weight: mean min(pi_learner / pi_engine, cap); truncated tokens: the share the cap cut."]
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    out = cfg.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "offpolicy_bf16.json").write_text(json.dumps({"setup": setup, "variants": rows}, indent=2))
    (out / "offpolicy_bf16.md").write_text(md)
    print(f"results -> {out}/offpolicy_bf16.{{json,md}}")


if __name__ == "__main__":
    main()
