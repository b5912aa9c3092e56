"""Stage 4: supervised fine-tuning on the clinical instruction data (the paper's SFT): loss on the
response tokens only, LoRA (r=8, alpha=32, dropout=0.1 on the attention projections) by default.

    python jobs/sft.py [preset=tiny] [sft.lora.enabled=false for full fine-tuning] [key=value ...]

Starts from the pretrain stage's model when there is one, else from model.path.
Output: runs/<preset>/sft/final (merged HF model + tokenizer), sft/adapter (LoRA), history, summary.
"""

import sys

import ray

from clinicalgpt.config import load_config
from clinicalgpt.runtime import init_ray
from clinicalgpt.stages import run_causal_stage


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    pretrained = cfg.stage_dir("pretrain") / "final"
    if (pretrained / "config.json").exists():
        source = str(pretrained)
    elif cfg.model.build_from_config:
        raise SystemExit(f"no pretrained model at {pretrained}: run jobs/pretrain.py preset={cfg.preset} first")
    else:
        source = cfg.model_path
    init_ray(cfg)
    return run_causal_stage(cfg, "sft", cfg.sft, source, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
