"""Stage 7: the clinical evaluation, the paper's four task families plus safety and bias, for several candidates
side by side (pretrained, SFT, PPO, DPO, any Hugging Face model path, or any OpenAI-compatible endpoint).

    python jobs/eval.py [eval.models=[pretrain,sft,ppo]] [eval.families=[exam,bias]] [eval.items.exam=1000]
        [eval.endpoints.base.url=http://host:8000/v1 eval.endpoints.base.model=m eval.models=[base,ppo]]
        [eval.judge=openai eval.judge_endpoint=gpt4 eval.endpoints.gpt4.url=... eval.endpoints.gpt4.model=gpt-4]

Families (the records of the test split; see clinicalgpt/evaluation/ for the scoring):
  conversation  dialogues cut at a doctor turn: BLEU-1..4, GLEU, ROUGE-1/2/L against the real turn
  exam          MCMLE / CMExam questions: the letter extracted from the reply (and, optionally, the
                option of highest likelihood); accuracy overall and per derived category
  diagnosis     records -> diagnosis; correct when the reply names the gold diagnosis or a KG synonym
  qa, safety    a judge (the reward model, or an OpenAI-compatible endpoint asked twice with the answers
                swapped) compares the last candidate's answers with each other one's: win / tie / lose
  bias          attitude statements about patient groups on a 5-point scale (the bundled items): attitude
                scores per group and dimension, from the answer and from the scale points' likelihood

Local models answer through vLLM rollout engines on Ray (the PPO rollout actor), greedily and batched; models of
the same architecture share the engines, each loading its weights in place. Answers are saved a chunk at a time
(items.jsonl): a rerun after a crash generates only what is missing.
Output, under runs/<preset>/eval/: items.jsonl (every item's answer per candidate, its prompt, reference and
scores), results.json, report.md (candidates as rows, as the paper's tables, with bootstrap intervals), a PNG chart
per family.
"""

import sys
import time

import ray

from clinicalgpt.config import load_config
from clinicalgpt.evaluation.items import FAMILIES, candidates
from clinicalgpt.evaluation.judges import JUDGES
from clinicalgpt.evaluation.run import evaluate
from clinicalgpt.lineage import write_lineage
from clinicalgpt.runtime import init_ray


def main(argv: list[str]) -> dict:
    started = time.time()
    cfg = load_config(argv)
    unknown = [f for f in cfg.eval.families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"eval.families: unknown {', '.join(map(repr, unknown))}; known: {', '.join(FAMILIES)}")
    if len(cfg.eval.models) < 2 and {"qa", "safety"} & set(cfg.eval.families):
        raise SystemExit("eval.families qa and safety compare models: give eval.models at least two, or leave them out")
    if cfg.eval.judge not in JUDGES:
        raise SystemExit(f"eval.judge={cfg.eval.judge!r}: {' or '.join(JUDGES)}")
    judged = {"qa", "safety"} & set(cfg.eval.families)
    if judged and cfg.eval.judge == "openai" and cfg.eval.judge_endpoint not in cfg.eval.endpoints:
        raise SystemExit(f"eval.judge=openai needs eval.judge_endpoint, the name of an eval.endpoints entry (got "
                         f"{cfg.eval.judge_endpoint!r}; defined: {', '.join(cfg.eval.endpoints) or 'none'})")
    systems = candidates(cfg)  # says which stage to run first
    if judged and cfg.eval.judge == "reward_model":
        cfg.stage_model(cfg.eval.judge_reward_model)  # likewise, before the models answer
    init_ray(cfg)
    results = evaluate(cfg, systems)
    write_lineage(cfg, "eval", argv, started)
    print(f"[eval] done in {results['seconds']:.0f}s: report.md, items.jsonl, results.json and the charts in "
          f"{cfg.stage_dir('eval')}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
