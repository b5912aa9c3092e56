"""Stage 6: PPO. Ray actors play the RLHF roles (actors/): vLLM rollout engines, the frozen SFT
reference, the reward (model or function), and a group of DeepSpeed ZeRO-2 learners (policy + critic);
the controller's pieces are in clinicalgpt/rlhf/.

    python jobs/ppo.py [preset=tiny] [ppo.steps=20] [ppo.reward=model|length:16|contains:医生|python:mod:fn]
        [ppo.advantage=gae|grpo|rloo] [ppo.kl_controller=fixed|adaptive] [key=value ...]
    ray job submit --working-dir . -- python jobs/ppo.py run_root=$PWD/runs data.root=/abs/corpora

One step: prompts (Ray Data) -> the rollout engines generate n responses per prompt -> in parallel,
reference log-probs, rewards, and the policy's own log-probs and values -> token-level rewards (the
score on the last token minus beta * KL per token) -> advantages (GAE, whitened; or GRPO / RLOO) ->
PPO-clip and clipped value losses over several epochs of minibatches on the learners -> the merged
policy weights pushed into the rollout engines (through the object store, or an NCCL broadcast between
GPUs: ppo.weight_sync) -> metrics.

Needs runs/<preset>/sft/final (the policy and reference) and, for ppo.reward=model, rm/final (the
reward, and the critic's starting point). A rerun resumes from the last checkpoint in ppo/checkpoints; so does
the running job when a role dies (up to ppo.max_failures times; rollout engines restart on their own).
Output: ppo/final (merged HF policy) and ppo/adapter (LoRA), history.jsonl, tensorboard, summary.json.
"""

import sys
import time

import ray

from clinicalgpt.config import load_config
from clinicalgpt.lineage import record_stage
from clinicalgpt.rlhf.train import train
from clinicalgpt.runtime import init_ray


def main(argv: list[str]) -> dict:
    started = time.time()
    cfg = load_config(argv)
    init_ray(cfg)
    summary = train(cfg)
    record_stage(cfg, "ppo", argv, started, summary)  # lineage.json, curves.png, a model card beside final/
    print(f"[ppo] done: reward {summary['first_reward']:.3f} -> {summary['last_reward']:.3f}, held-out reward "
          f"{summary['first_eval_reward']:.3f} -> {summary['last_eval_reward']:.3f} (KL {summary['last_eval_kl']:.3f}); "
          f"policy -> {summary['model']}", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
