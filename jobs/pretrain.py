"""Stage 3 (optional for real models): continued causal-LM training on the corpus text, full parameters.
For the tiny preset this is what teaches the from-scratch model Chinese medical text.

    python jobs/pretrain.py [preset=tiny] [pretrain.max_steps=300] [key=value ...]

Output: runs/<preset>/pretrain/final (HF model + tokenizer), history.jsonl, tensorboard/, summary.json.
Rerunning resumes from the last checkpoint in runs/<preset>/pretrain/ray_train.
"""

import sys
from pathlib import Path

import ray

from clinicalgpt.config import load_config
from clinicalgpt.runtime import init_ray
from clinicalgpt.stages import run_causal_stage


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    if not (Path(cfg.model_path) / "config.json").exists() and cfg.model.build_from_config:
        raise SystemExit(f"no base model at {cfg.model_path}: run jobs/data.py and jobs/bootstrap.py first")
    init_ray(cfg)
    return run_causal_stage(cfg, "pretrain", cfg.pretrain, cfg.model_path, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
