"""How long a rollout engine takes to start on CPUs, with vLLM's engine core in the rollout actor's process
(what actors/rollout.py does when Ray gives the actor no GPU) against the baseline, vLLM's default: the
engine core in a process of its own. Each start is a fresh Ray session and a `RolloutEngines` start of the
run's SFT model, then one greedy answer (the same tokens both ways, or the bench fails).

    .venv/bin/python bench/engine_start.py [--run-dir runs/tiny] [--repeats 3]

Prints the median start time of each and their ratio; writes <run-dir>/bench/engine_start.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from actors.rollout import RolloutEngines
from clinicalgpt.config import load_config
from clinicalgpt.runtime import JOB_ENV

PROMPT = [1, 2, 3, 4, 5, 6]


def start_once(model: str, separate_process: bool) -> tuple[float, list[int]]:
    env = {**JOB_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if separate_process else "0"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        cfg = load_config([])
        engines = RolloutEngines(cfg.eval.rollout, cfg.eval.engine, "bench", cfg.seq.max_len, 0, cfg.model.dtype)
        started = time.time()
        actor = engines.load("sft", model)[0]
        seconds = time.time() - started
        tokens = ray.get(actor.generate.remote([PROMPT], 1, 16, 0.0))[0]["ids"]
        engines.close()
        return seconds, tokens
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = str(Path(args.run_dir).resolve() / "sft" / "final")
    times, answers = {"in_process": [], "separate_process": []}, set()
    for _ in range(args.repeats):  # interleaved, so that the machine's drift hits both alike
        for mode in times:
            seconds, tokens = start_once(model, separate_process=mode == "separate_process")
            times[mode].append(seconds)
            answers.add(tuple(tokens))
            print(f"[bench] {mode}: engine started in {seconds:.1f}s", flush=True)
    if len(answers) != 1:
        raise SystemExit(f"the two ways answered differently: {answers}")
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    result = {"model": model, "repeats": args.repeats, "seconds": times, "median_s": medians,
              "ratio_separate_over_in_process": medians["separate_process"] / medians["in_process"]}
    out = Path(args.run_dir) / "bench" / "engine_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"[bench] engine start, median of {args.repeats}: in the actor's process {medians['in_process']:.1f}s, "
          f"vLLM's own process (baseline) {medians['separate_process']:.1f}s: "
          f"{result['ratio_separate_over_in_process']:.2f}x faster; -> {out}")


if __name__ == "__main__":
    main()
