"""Stage 5: the reward model: the SFT model plus a scalar head, trained with the pairwise rank loss on
the medical preference pairs and on pairs constructed from ground truth (KG facts swapped for wrong
ones, exam answers naming a wrong option). Reports pairwise accuracy on held-out pairs per source.

    python jobs/rm.py [preset=tiny] [rm.max_steps=60] [key=value ...]

Output: runs/<preset>/rm/final (HF AutoModelForSequenceClassification + tokenizer), history,
tensorboard, accuracy.json / accuracy.md, summary.json, lineage.json, curves.png.
"""

import sys

import ray

from clinicalgpt.config import load_config
from clinicalgpt.reward_model import run_reward_stage
from clinicalgpt.runtime import init_ray


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    source = cfg.stage_model("sft")  # refuses, saying what to run, when there is none yet
    init_ray(cfg)
    summary = run_reward_stage(cfg, source, argv)
    print(f"[rm] done: held-out loss {summary['first_eval_loss']:.3f} -> {summary['last_eval_loss']:.3f}, "
          f"pairwise accuracy {summary['accuracy']:.3f}; model -> {summary['model']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
