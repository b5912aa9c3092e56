"""One PPO step over the roles, as cleanRL writes it: generate, score, advantages, PPO epochs on the
learners, weight push; and the held-out reward."""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from .. import rl
from ..config import Config
from ..evaluation.metrics import degenerate, extract_answer, output_health
from ..experience import build_batch, split_batch
from .roles import Roles


def sharded(actors: list, method: str, batch: dict, *args) -> list:
    """Call `method` on each actor with its row shard of the batch and args (ObjectRefs, in row order)."""
    return [getattr(a, method).remote(s, *args) for a, s in zip(actors, split_batch(batch, len(actors)))]


def generate(cfg: Config, roles: Roles, prompts: list[list[int]], n: int, seed: int, temperature: float):
    """Responses from the rollout engines (temperature 0: greedy): the batch, the engines' log-probs of the
    sampled tokens, and which responses the length limit cut (no EOS)."""
    ppo = cfg.ppo
    samples = roles.rollout.generate(prompts, n, ppo.max_new_tokens, temperature, ppo.top_p, seed)
    batch = build_batch([p for p in prompts for _ in range(n)], [s["ids"] for s in samples], roles.pad_id)
    engine_logprobs = np.zeros_like(batch["response_mask"])
    for i, s in enumerate(samples):
        engine_logprobs[i, :len(s["logprobs"])] = s["logprobs"]
    return batch, engine_logprobs, np.array([s["truncated"] for s in samples])


def responses(roles: Roles, batch: dict) -> list[str]:
    """The batch's responses as text."""
    P = batch["prompt_len"]
    return roles.tokenizer.batch_decode([ids[P:P + int(n)] for ids, n in zip(batch["input_ids"],
                                                                             batch["response_mask"].sum(1))],
                                        skip_special_tokens=True)


def score(cfg: Config, roles: Roles, batch: dict, truncated: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """Reference log-probs, rewards, and the policy's log-probs and values, computed in parallel. The log-probs
    are taken at the temperature the tokens were sampled at (0: greedy, scored at 1); the scores PPO optimises are
    the rewards less ppo.length_penalty per share of the token limit, and ppo.truncated_score for a response the
    length limit cut, ppo.degenerate_score for a degenerate one, when those are set."""
    ref = sharded(roles.reference, "logprobs", batch, temperature)
    rew = sharded(roles.reward, "score", batch)
    own = ray.get(sharded(roles.learners.ranks, "logprobs_and_values", batch, temperature))
    ppo = cfg.ppo
    degenerates = (torch.tensor([degenerate(r) for r in responses(roles, batch)])
                   if ppo.degenerate_score is not None else None)
    rewards = torch.as_tensor(np.concatenate(ray.get(rew)))
    scores = rl.response_scores(rewards, torch.as_tensor(truncated), ppo.truncated_score,
                                torch.as_tensor(batch["response_mask"]).sum(1), ppo.length_penalty,
                                ppo.max_new_tokens, degenerates, ppo.degenerate_score)
    out = {"ref_logprobs": np.concatenate(ray.get(ref)), "rewards": rewards.numpy(), "scores": scores.numpy(),
           "old_logprobs": np.concatenate([o["logprobs"] for o in own])}
    if "values" in own[0]:
        out["old_values"] = np.concatenate([o["values"] for o in own])
    return out


def advantages(cfg: Config, scored: dict, mask: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Token rewards (the score on the last token minus beta * KL per token), then ppo.advantage's estimator."""
    ppo = cfg.ppo
    t = {k: torch.as_tensor(v) for k, v in scored.items()}
    kl = rl.kl_per_token(t["old_logprobs"], t["ref_logprobs"], ppo.kl_estimator) * mask
    rewards = rl.token_rewards(t["scores"], kl, mask, beta)
    adv, returns = rl.ADVANTAGE_ESTIMATORS[ppo.advantage](rewards, t.get("old_values"), mask, ppo)
    return {"kl": kl, "advantages": adv, "returns": returns}


def ppo_step(cfg: Config, roles: Roles, prompts: list[list[int]], beta: float, step: int,
             ptx: dict[str, np.ndarray] | None = None) -> dict:
    """One iteration: generate, score, advantages, PPO epochs on the learners (with PPO-ptx's packed LM rows, split
    among the ranks, when given), weight push. Its metrics."""
    ppo = cfg.ppo
    t0 = time.time()
    batch, engine_logprobs, truncated = generate(cfg, roles, prompts, ppo.samples_per_prompt,
                                                 seed=(ppo.seed * 100003 + step) * 10007, temperature=ppo.temperature)
    t1 = time.time()
    scored = score(cfg, roles, batch, truncated, ppo.temperature)
    mask = torch.as_tensor(batch["response_mask"])
    adv = advantages(cfg, scored, mask, beta)
    t2 = time.time()
    experience = {**batch, "old_logprobs": scored["old_logprobs"], "engine_logprobs": engine_logprobs,
                  "advantages": adv["advantages"].numpy()}
    if adv["returns"] is not None:
        experience.update(old_values=scored["old_values"], returns=adv["returns"].numpy())
    ptx_shares = split_batch(ptx, ppo.learner.num) if ptx is not None else [None] * ppo.learner.num
    stats = ray.get([r.train.remote(s, step, p) for r, s, p in zip(
        roles.learners.ranks, split_batch(experience, ppo.learner.num), ptx_shares)])
    t3 = time.time()
    roles.rollout.push_weights()
    t4 = time.time()
    row = {"step": step + 1, "reward": float(scored["scores"].mean()), "reward_std": float(scored["scores"].std()),
           "kl": float(adv["kl"].sum(1).mean()), "beta": beta, "response_length": float(mask.sum(1).mean()),
           "truncated_responses": float(truncated.mean()),  # cut at ppo.max_new_tokens (no EOS)
           **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]},
           # The engine's log-probs against the learner's for the same tokens: near 0 unless the weights diverged
           # (bf16 rounding) or top_p < 1 renormalized the engine's over the nucleus.
           "engine_logprob_gap": float(rl.masked_mean((torch.as_tensor(engine_logprobs)
                                                       - torch.as_tensor(scored["old_logprobs"])).abs(), mask)),
           "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2, "sync_s": t4 - t3, "step_s": t4 - t0,
           "samples_per_s": len(mask) / (t4 - t0)}
    if adv["returns"] is not None:
        row["explained_variance"] = rl.explained_variance(torch.as_tensor(scored["old_values"]), adv["returns"], mask)
    return row


def held_out_reward(cfg: Config, roles: Roles, prompts: list[list[int]],
                    exam: list[tuple[list[int], dict[str, str]]]) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean reward (the reward's own, without the penalties of the scores PPO
    optimises: arms with and without them compare on it), KL to the reference (summed per response), and the
    answers' output health (evaluation.metrics.output_health, as eval_<name>); and to exam questions (prompt,
    options): the share answered with an option letter (eval_exam_compliant)."""
    batch, _, truncated = generate(cfg, roles, prompts, 1, cfg.ppo.seed, temperature=0.0)
    health = {f"eval_{k}": v for k, v in output_health(responses(roles, batch), truncated.tolist()).items()}
    if exam:
        answers = roles.rollout.generate([p for p, _ in exam], 1, cfg.ppo.max_new_tokens, 0.0, 1.0, cfg.ppo.seed)
        replies = roles.tokenizer.batch_decode([a["ids"] for a in answers], skip_special_tokens=True)
        health["eval_exam_compliant"] = float(np.mean([extract_answer(r, options) != "" for r, (_, options)
                                                       in zip(replies, exam)]))
    scored = score(cfg, roles, batch, truncated, temperature=0.0)
    mask = torch.as_tensor(batch["response_mask"])
    # k3, not k1: greedy answers are not samples of the policy, and k1's sum over them can go negative.
    kl = rl.kl_per_token(torch.as_tensor(scored["old_logprobs"]), torch.as_tensor(scored["ref_logprobs"]), "k3")
    return {"eval_reward": float(scored["rewards"].mean()), "eval_kl": float((kl * mask).sum(1).mean()),
            "eval_response_length": float(mask.sum(1).mean()), **health}
