"""The evaluation's exam option likelihoods (clinicalgpt/evaluation/items.py) scored as actors/rollout.py does on
CPUs, reading vLLM's prefix cache in 32-token KV blocks, against the baseline, vLLM's defaults on CPUs: 128-token
blocks and prompt log-probs that skip the cache (every option recomputes its item's prompt). The run's SFT model
and exam items; one engine in this process each way; the same log-probs both ways, or the bench fails.

    .venv/bin/python bench/option_likelihood.py [--run-dir runs/tiny] [--repeats 3]

Prints the median time of each and their ratio; writes <run-dir>/bench/option_likelihood.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import ray

from actors.rollout import ROLLOUT_ENV, continuation_logprobs
from clinicalgpt.config import load_config
from clinicalgpt.evaluation.items import load_items, option_requests
from clinicalgpt.runtime import JOB_ENV, init_ray
from clinicalgpt.tokenizer import load_tokenizer

WAYS = {"baseline": {"block_size": 128, "read_cache": False}, "ours": {"block_size": 32, "read_cache": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    cfg = load_config([f"run_root={run_dir.parent}", f"preset={run_dir.name}"])
    init_ray(cfg)
    rows = load_items(cfg)["exam"]
    ray.shutdown()
    model = str(run_dir / "sft" / "final")
    prompts, continuations, _ = option_requests(load_tokenizer(model, cfg.model.chat_template), rows)
    os.environ.update({**JOB_ENV, **ROLLOUT_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # as in the rollout actor
    from vllm import LLM
    engines = {way: LLM(model, dtype=cfg.model.dtype, max_model_len=cfg.seq.max_len, seed=0, enforce_eager=True,
                        block_size=s["block_size"]) for way, s in WAYS.items()}
    times, scored = {way: [] for way in WAYS}, {}
    for _ in range(args.repeats):  # interleaved, so that the machine's drift hits both alike
        for way, llm in engines.items():
            llm.reset_prefix_cache()  # each repeat starts cold, as an evaluation does
            started = time.time()
            scored[way] = continuation_logprobs(llm, prompts, continuations, read_cache=WAYS[way]["read_cache"])
            times[way].append(time.time() - started)
            print(f"[bench] {way}: {len(prompts)} options of {len(rows)} items in {times[way][-1]:.1f}s", flush=True)
    gap = max(np.abs(np.array(a) - np.array(b)).max() for a, b in zip(scored["baseline"], scored["ours"]))
    if gap > 1e-4:
        raise SystemExit(f"the two ways' log-probs differ by up to {gap:.2e}")
    medians = {way: statistics.median(t) for way, t in times.items()}
    result = {"model": model, "items": len(rows), "options": len(prompts), "repeats": args.repeats,
              "seconds": times, "median_s": medians, "max_logprob_gap": float(gap),
              "speedup": medians["baseline"] / medians["ours"]}
    out = run_dir / "bench" / "option_likelihood.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"[bench] median: baseline {medians['baseline']:.1f}s, ours {medians['ours']:.1f}s: "
          f"{result['speedup']:.2f}x faster; log-probs equal to {gap:.1e}; -> {out}")


if __name__ == "__main__":
    main()
