"""PPO's metrics, per step: to the console (with rate and ETA), history.jsonl, TensorBoard and Ray's
metrics (Prometheus, plotted by monitoring/grafana-dashboard.json); and the run's summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..lineage import read_history

# Exported to Prometheus as ray_clinicalgpt_ppo_<name>.
METRICS = ("reward", "kl", "eval_reward", "eval_degenerate", "eval_truncated", "eval_exam_compliant", "health_alarm",
           "samples_per_s", "generate_s", "score_s", "train_s", "sync_s", "step_s", "step")
# How far a held-out answer share may move from the SFT policy's (PPO's step 0) before the run warns that the
# policy's outputs are collapsing (monitoring/alerts.yml fires on the same count): a rise, or (negative) a fall.
HEALTH_LIMITS = {"eval_empty": 0.1, "eval_degenerate": 0.2, "eval_truncated": 0.3, "eval_exam_compliant": -0.2}


def health_warnings(row: dict, sft: dict) -> list[str]:
    """What in a held-out evaluation row is past HEALTH_LIMITS relative to the SFT policy's row."""
    return [f"{k[5:]} answers {sft[k]:.2f} -> {row[k]:.2f}" for k, limit in HEALTH_LIMITS.items()
            if k in row and k in sft and (row[k] - sft[k]) / limit > 1 + 1e-9]  # past it, not at it


class Log:
    """Per-step metrics to the console, history.jsonl, TensorBoard and Ray metrics (Prometheus)."""

    def __init__(self, cfg: Config, out: Path):
        from ray.util.metrics import Gauge
        from torch.utils.tensorboard import SummaryWriter
        self.cfg, self.out, self.started = cfg, out, time.time()
        self.history = (out / "history.jsonl").open("a", buffering=1)
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        self.gauges = {k: Gauge(f"clinicalgpt_ppo_{k}", description=f"PPO {k}") for k in METRICS}
        self.first_step = None
        # The SFT policy's held-out health (step 0), for the warnings; a resumed run reads it back.
        self.sft = next((r for r in read_history(out / "history.jsonl") if r["step"] == 0), None)

    def write(self, row: dict) -> None:
        step = row["step"]
        if step == 0:
            self.sft = row
        elif "eval_reward" in row and self.sft is not None:
            warnings = health_warnings(row, self.sft)
            row["health_alarm"] = len(warnings)
            if warnings:
                print(f"[ppo] WARNING step {step}: the held-out answers are degrading against the SFT policy's: "
                      f"{'; '.join(warnings)} (limits of change: {HEALTH_LIMITS}); see docs/ppo.md", flush=True)
        self.history.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                self.tensorboard.add_scalar(f"ppo/{k}", v, step)
            if k in self.gauges:
                self.gauges[k].set(v)
        ppo = self.cfg.ppo
        if "reward" not in row:
            print(f"[ppo] before training: held-out reward {row['eval_reward']:.3f}, "
                  f"response length {row['eval_response_length']:.1f}", flush=True)
            return
        self.first_step = self.first_step or step
        if step % ppo.log_every == 0 or "eval_reward" in row or step == ppo.steps:
            eta = (time.time() - self.started) / (step - self.first_step + 1) * (ppo.steps - step)
            held = f" held-out reward {row['eval_reward']:.3f} (KL {row['eval_kl']:.2f})" if "eval_reward" in row else ""
            print(f"[ppo] step {step}/{ppo.steps} reward {row['reward']:.3f}±{row['reward_std']:.2f} KL {row['kl']:.3f} "
                  f"len {row['response_length']:.1f} clip {row['clip_fraction']:.2f}{held} | {row['samples_per_s']:.1f} "
                  f"samples/s (generate {row['generate_s']:.1f}s, score {row['score_s']:.1f}s, train {row['train_s']:.1f}s, "
                  f"sync {row['sync_s']:.2f}s) ETA {eta:,.0f}s", flush=True)

    def summary(self, model: str) -> dict:
        self.history.close()
        self.tensorboard.close()
        rows = read_history(self.out / "history.jsonl")  # a step redone after a restart counts once
        train = [r for r in rows if "reward" in r]
        evals = [r for r in rows if "eval_reward" in r]
        head, tail = train[:3], train[-3:]
        summary = {
            "steps": train[-1]["step"], "model": model,
            "first_reward": float(np.mean([r["reward"] for r in head])),
            "last_reward": float(np.mean([r["reward"] for r in tail])),
            "first_eval_reward": evals[0]["eval_reward"], "last_eval_reward": evals[-1]["eval_reward"],
            "first_eval_kl": evals[0]["eval_kl"], "last_eval_kl": evals[-1]["eval_kl"],
            "last_kl": float(np.mean([r["kl"] for r in tail])),
            "timing_s": {k: float(np.mean([r[k] for r in train])) for k in
                         ("generate_s", "score_s", "train_s", "sync_s", "step_s")},
            "samples_per_s": float(np.mean([r["samples_per_s"] for r in train])),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
