"""Stage 5b: the evaluation's judge of the qa and safety families: a second reward model, trained like the
one PPO optimises (jobs/rm.py) but on the other half of the training pairs (rm.pair_half) and with the next
seed, so the evaluation's verdict is not the opinion PPO was trained to please.

    python jobs/judge.py [preset=tiny] [key=value ...]

Output: runs/<preset>/judge/final and the same files as jobs/rm.py (accuracy.json/md on the same held-out pairs).
"""

import sys

import ray

from clinicalgpt.config import load_config
from clinicalgpt.reward_model import run_reward_stage, stage_config
from clinicalgpt.runtime import init_ray


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    stage_config(cfg, "judge")  # refuses before anything starts when the pairs are not split
    source = cfg.stage_model("sft")  # refuses, saying what to run, when there is none yet
    init_ray(cfg)
    summary = run_reward_stage(cfg, source, argv, stage="judge")
    print(f"[judge] done: pairwise accuracy {summary['accuracy']:.3f}; model -> {summary['model']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
