"""Stage 6b: offline preference optimisation (the DPO family) from the SFT model on the reward model's pairs (the
preference corpora, their ranked sets, and the pairs constructed from ground truth): the second alignment path
beside PPO (recipe.align=dpo or both). LoRA by default, on the same Ray Train + DeepSpeed ZeRO-2 trainer.

    python jobs/dpo.py [preset=tiny] [dpo.loss=sigmoid|ipo|simpo] [dpo.beta=0.1] [dpo.label_smoothing=0.1]

Output: runs/<preset>/dpo/final (merged HF model + tokenizer), dpo/adapter (LoRA), dpo/reference (the SFT model's
log-probs of every pair, computed once), history (loss, implicit-reward accuracy and margin, chosen and rejected
log-probs), tensorboard, accuracy.json / accuracy.md (held-out, per source), summary.json, lineage.json, curves.png.
"""

import sys

import ray

from clinicalgpt.config import load_config
from clinicalgpt.dpo import run_dpo_stage
from clinicalgpt.runtime import init_ray


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    source = cfg.stage_model("sft")  # refuses, saying what to run, when there is none yet
    init_ray(cfg)
    summary = run_dpo_stage(cfg, source, argv)
    print(f"[dpo] done: {summary['steps']} steps, held-out loss {summary['first_eval_loss']:.3f} -> "
          f"{summary['last_eval_loss']:.3f}, implicit-reward accuracy {summary['accuracy']:.3f}; model -> "
          f"{summary['model']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
