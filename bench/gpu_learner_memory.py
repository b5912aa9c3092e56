"""Does a PPO learner rank fit where jobs/plan.py says it does? Measures, on a CUDA GPU, the memory and time of
one learner micro-step for a preset's model (the policy's PPO update, then the critic's value update, as
actors/learner.py takes them) and of a weight push, and prints them beside the plan's estimate (docs/sizing.md).

    python jobs/plan.py preset=bloom-7b out=plan.json               # the estimate, on any machine
    python bench/gpu_learner_memory.py --plan plan.json [--config-dir DIR] preset=bloom-7b [key=value ...]

Random weights of the model's shape (the config.json in --config-dir, else in model.path), random tokens in
the plan's micro-batch (ppo.minibatch / learner ranks rows of ppo.max_prompt_len + ppo.max_new_tokens), the
preset's dtype, LoRA, gradient checkpointing (ppo.gradient_checkpointing) and losses; torch's AdamW stands in
for DeepSpeed's ZeRO-2 optimizer (the LoRA adapter's state is a few MB either way). Needs torch, transformers,
peft and omegaconf: no Ray, DeepSpeed or vLLM, so it runs on a bare GPU machine. Prints a table and writes
--out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from clinicalgpt import rl
from clinicalgpt.config import load_config
from clinicalgpt.experience import build_batch, response_logprobs, token_values
from clinicalgpt.modeling import DTYPES, apply_lora, enable_gradient_checkpointing, trained_weights, without_dropout

GB = 1e9


def peak_of(fn) -> tuple[float, float, float]:
    """(peak GB allocated while fn runs, peak GB reserved by PyTorch's caching allocator, its seconds)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB, time.perf_counter() - t0


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", type=Path, required=True, help="jobs/plan.py's JSON for the same settings")
    ap.add_argument("--config-dir", type=Path, help="a folder with the model's config.json (default: model.path)")
    ap.add_argument("--steps", type=int, default=3, help="timed micro-steps after one warm-up")
    ap.add_argument("--out", type=Path, default=Path("gpu_learner_memory.json"))
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(overrides)
    ppo, dtype = cfg.ppo, DTYPES["bfloat16" if cfg.ppo.bf16 else cfg.model.dtype]
    plan = json.loads(args.plan.read_text())
    estimate = next(a for a in plan["actors"] if a["stage"] == "ppo" and a["role"] == "learner")
    if estimate["checkpointing"] != ppo.gradient_checkpointing:
        raise SystemExit(f"{args.plan} was planned with ppo.gradient_checkpointing={estimate['checkpointing']}: "
                         "plan and measure the same settings")
    config = AutoConfig.from_pretrained(args.config_dir or cfg.model_path)
    config.num_labels, config.pad_token_id = 1, config.pad_token_id or 0
    device = torch.device("cuda")
    torch.manual_seed(0)

    with device:
        policy = apply_lora(AutoModelForCausalLM.from_config(config, dtype=dtype), ppo.lora)
        critic = (apply_lora(AutoModelForSequenceClassification.from_config(config, dtype=dtype), ppo.lora, "SEQ_CLS")
                  if rl.ADVANTAGE_ESTIMATORS[ppo.advantage].uses_critic else None)
    models = [m for m in (policy, critic) if m is not None]
    for model in models:  # as the learner sets them up
        if ppo.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        without_dropout(model, ppo.gradient_checkpointing)
    weights_gb = torch.cuda.memory_allocated() / GB
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=ppo.lr) for m in models]

    rows = ppo.minibatch // ppo.learner.num
    rng = np.random.default_rng(0)
    batch = build_batch(rng.integers(10, config.vocab_size, (rows, ppo.max_prompt_len)).tolist(),
                        rng.integers(10, config.vocab_size, (rows, ppo.max_new_tokens)).tolist(), config.pad_token_id)
    mask = torch.as_tensor(batch["response_mask"], device=device)
    with torch.no_grad():
        old = response_logprobs(policy, batch, device, temperature=ppo.temperature)
    advantages, old_values, returns = (torch.randn_like(mask) for _ in range(3))

    def policy_update():
        logp, _ = response_logprobs(policy, batch, device, with_entropy=True, temperature=ppo.temperature)
        loss, _ = rl.policy_loss(logp, old, advantages, mask, ppo.clip)
        loss.backward()
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)

    def critic_update():
        loss = rl.value_loss(token_values(critic, batch, device), old_values, returns, mask, ppo.value_clip)
        loss.backward()
        optimizers[1].step()
        optimizers[1].zero_grad(set_to_none=True)

    updates = {"policy": policy_update, **({"critic": critic_update} if critic is not None else {})}
    measured = {}
    for name, update in updates.items():
        update()  # warm-up: kernels, the optimizer's state
        runs = [peak_of(update) for _ in range(args.steps)]
        measured[name] = {"peak_gb": max(r[0] for r in runs), "reserved_gb": max(r[1] for r in runs),
                          "seconds": float(np.median([r[2] for r in runs]))}
    push_peak, _, push_s = peak_of(lambda: [t.cpu() for _, t in trained_weights(policy)])
    free, total = torch.cuda.mem_get_info()
    result = {
        "preset": cfg.preset, "gpu": torch.cuda.get_device_name(), "gpu_memory_gb": round(total / GB, 1),
        "torch": torch.__version__, "rows": rows, "tokens": ppo.max_prompt_len + ppo.max_new_tokens,
        "gradient_checkpointing": ppo.gradient_checkpointing, "weights_gb": round(weights_gb, 2),
        "updates": {k: {n: round(x, 3) for n, x in v.items()} for k, v in measured.items()},
        "tokens_per_s": round(rows * (ppo.max_prompt_len + ppo.max_new_tokens) / sum(v["seconds"] for v in measured.values())),
        "push": {"peak_gb": round(push_peak, 2), "over_weights_gb": round(push_peak - weights_gb, 2), "seconds": round(push_s, 2)},
        # What the process holds beside PyTorch's reserved memory: the CUDA context, cuBLAS workspaces.
        "outside_pytorch_gb": round((total - free - torch.cuda.memory_reserved()) / GB, 2),
        "plan": {"memory_gb": estimate["memory"], "total_gb": estimate["total_gb"]},
    }
    peak = max(v["peak_gb"] for v in measured.values())
    planned = estimate["total_gb"] - estimate["memory"]["runtime"]
    result["peak_over_plan"] = round(peak / planned, 3)
    print(f"{cfg.preset} PPO learner rank on {result['gpu']}: micro-batch {rows} x {result['tokens']} tokens, "
          f"gradient checkpointing {'on' if ppo.gradient_checkpointing else 'off'}")
    print(f"  weights {weights_gb:.1f} GB (plan {estimate['memory']['weights']:.1f})")
    for name, v in measured.items():
        print(f"  {name} update: peak {v['peak_gb']:.1f} GB allocated, {v['reserved_gb']:.1f} GB reserved, "
              f"{v['seconds']:.2f} s")
    print(f"  plan without its runtime allowance: {planned:.1f} GB; measured peak / plan = {peak / planned:.2f}")
    print(f"  weight push: peak {push_peak:.1f} GB ({push_peak - weights_gb:+.2f} GB over the weights), {push_s:.1f} s")
    print(f"  outside PyTorch's memory (CUDA context, workspaces): {result['outside_pytorch_gb']:.1f} GB "
          f"(plan's runtime allowance {estimate['memory']['runtime']:.1f})")
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
