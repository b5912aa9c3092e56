"""Stage 7: the clinical evaluation, the paper's four task families plus safety, for several models side
by side (pretrained, SFT, PPO, or any Hugging Face model path).

    python jobs/eval.py [eval.models=[pretrain,sft,ppo]] [eval.families=[exam,diagnosis]]
        [eval.items.exam=1000] [eval.judge=openai eval.judge_url=http://host:8000/v1 eval.judge_model=m]

Families (the records of the test split; see clinicalgpt/evaluation/ for the scoring):
  conversation  dialogues cut at a doctor turn: BLEU-1..4, GLEU, ROUGE-1/2/L against the real turn
  exam          MCMLE / CMExam questions: the letter extracted from the reply (and, optionally, the
                option of highest likelihood); accuracy overall and per derived category
  diagnosis     records -> diagnosis; correct when the reply names the gold diagnosis or a KG synonym
  qa, safety    a judge (the reward model, or an OpenAI-compatible endpoint asked twice with the answers
                swapped) compares the last model's answers with each other model's: win / tie / lose

Every model answers through vLLM rollout engines on Ray (the PPO rollout actor), greedily and batched;
models of the same architecture share the engines, each loading its weights in place.
Output, under runs/<preset>/eval/: items.json (every item's prompt, output, reference and score),
results.json, report.md (models as rows, as the paper's tables), one PNG chart per family.
"""

import sys
import time

import ray

from clinicalgpt.config import load_config
from clinicalgpt.evaluation.items import FAMILY_TASK
from clinicalgpt.evaluation.judges import JUDGES
from clinicalgpt.evaluation.run import evaluate
from clinicalgpt.lineage import write_lineage
from clinicalgpt.runtime import init_ray


def main(argv: list[str]) -> dict:
    started = time.time()
    cfg = load_config(argv)
    unknown = [f for f in cfg.eval.families if f not in FAMILY_TASK]
    if unknown:
        raise SystemExit(f"eval.families: unknown {', '.join(map(repr, unknown))}; known: {', '.join(FAMILY_TASK)}")
    if len(cfg.eval.models) < 2 and {"qa", "safety"} & set(cfg.eval.families):
        raise SystemExit("eval.families qa and safety compare models: give eval.models at least two, or leave them out")
    if cfg.eval.judge not in JUDGES:
        raise SystemExit(f"eval.judge={cfg.eval.judge!r}: {' or '.join(JUDGES)}")
    paths = [cfg.stage_model(name) for name in cfg.eval.models]  # says which stage to run first
    if cfg.eval.judge == "reward_model" and {"qa", "safety"} & set(cfg.eval.families):
        cfg.stage_model(cfg.eval.judge_reward_model)  # likewise, before the models answer
    init_ray(cfg)
    results = evaluate(cfg, paths)
    write_lineage(cfg, "eval", argv, started)
    print(f"[eval] done in {results['seconds']:.0f}s: report.md, items.json, results.json and the charts in "
          f"{cfg.stage_dir('eval')}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
