"""The RL math of PPO and its critic-free variants, as pure tensor functions, and the registries that
name them in the config (ppo.kl_estimator, ppo.advantage, ppo.kl_controller): adding an estimator is one
function and one name.

Layout of every per-token tensor: [batch, response_len], one column per generated token, right-padded;
`mask` is 1 on real response tokens. A log-prob at column t is log p(response[t] | prompt, response[:t]);
a value at column t is the critic's estimate before emitting response[t].
"""

from __future__ import annotations

from typing import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population variance); padding comes out as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# Schulman's estimators of KL(pi || pi_ref) from samples of pi, as functions of log r = logp - ref_logp:
# k1 = log r, k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r' = pi_ref / pi.
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio ** 2,
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
}


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) by one of KL_ESTIMATORS."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp - ref_logp)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-token reward of Stiennon et al.: -beta * KL on every response token, plus the reward
    model's score on the last one."""
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(score)), last] += score
    return rewards


def response_scores(scores: torch.Tensor, truncated: torch.Tensor, truncated_score: float | None,
                    lengths: torch.Tensor | None = None, length_penalty: float = 0.0, max_new_tokens: int = 1,
                    degenerate: torch.Tensor | None = None, degenerate_score: float | None = None) -> torch.Tensor:
    """The reward of each response: its score less length_penalty x its share of the token limit (lengths /
    max_new_tokens; a counterweight to a reward model that favours long answers); or truncated_score (when not
    None) for a response the length limit cut (no EOS): an unfinished answer gets a fixed score, whatever its text;
    or degenerate_score (when not None) for a degenerate one (empty, or one phrase repeated), cut or not."""
    if length_penalty:
        scores = scores - length_penalty * lengths.to(scores.dtype) / max_new_tokens
    for flags, fixed in ((truncated, truncated_score), (degenerate, degenerate_score)):
        if fixed is not None:
            scores = torch.where(flags, torch.as_tensor(fixed, dtype=scores.dtype), scores)
    return scores


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over each response; the value after the last token
    is 0 (the episode ends). Returns (advantages, returns = advantages + values), 0 on padding."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def group_advantages(returns: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """Critic-free advantages of whole responses, n samples per prompt in consecutive rows.
    grpo: (R - group mean) / (group std + eps); rloo: R - mean of the other samples of the prompt. Both
    compare the samples of a prompt: one sample has no std (grpo: NaN) and no others (rloo)."""
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"unknown group estimator {estimator!r} (grpo, rloo)")
    if group_size < 2:
        raise ValueError(f"{estimator} needs at least 2 samples per prompt (ppo.samples_per_prompt), got {group_size}")
    groups = returns.view(-1, group_size)
    if estimator == "grpo":
        out = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)
    else:
        out = (groups - groups.mean(1, keepdim=True)) * group_size / (group_size - 1)
    return out.reshape(-1)


# ppo.advantage: name -> fn(token rewards, the critic's values or None, mask, the ppo config) ->
# (advantages, returns for the critic or None). `uses_critic` says whether PPO trains a value model for it;
# `min_samples` is the fewest ppo.samples_per_prompt it works with (the job refuses fewer before starting).
ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def advantage_estimator(name: str, uses_critic: bool = False, min_samples: int = 1):
    def register(fn):
        fn.uses_critic, fn.min_samples = uses_critic, min_samples
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return register


@advantage_estimator("gae", uses_critic=True)
def gae_advantages(rewards, values, mask, ppo):
    """GAE, whitened over the batch's tokens (ppo.whiten_advantages): the critic's advantages have no fixed
    scale. The group estimators are already centred within each prompt, and whitening them again, token-
    weighted, would give a group whose samples all scored alike non-zero advantages that grow with length."""
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    return (whiten(advantages, mask) if ppo.whiten_advantages else advantages), returns


@advantage_estimator("grpo", min_samples=2)
def grpo_advantages(rewards, values, mask, ppo):
    return group_advantages(rewards.sum(1), ppo.samples_per_prompt, "grpo")[:, None] * mask, None


@advantage_estimator("rloo", min_samples=2)
def rloo_advantages(rewards, values, mask, ppo):
    return group_advantages(rewards.sum(1), ppo.samples_per_prompt, "rloo")[:, None] * mask, None


def truncated_is_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling (Yao et al. 2025, as in verl and OpenRLHF): the engines sample from a
    slightly different policy than the learner's (bf16 rounds small LoRA updates away from the merged weights;
    other kernels), so each token's policy-gradient term is weighted by min(pi_old / pi_engine, cap), pi_old
    being the learner's policy before the update. Detached weights, with their mean and the fraction of
    tokens whose ratio the cap truncated."""
    ratio = torch.exp(old_logp - engine_logp).detach()
    weights = ratio.clamp(max=cap)
    return weights, {"tis_weight": float(masked_mean(weights, mask)),
                     "tis_truncated_tokens": float(masked_mean((ratio > cap).float(), mask))}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, weights: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip: mean over tokens of w * max(-A r, -A clip(r, 1-e, 1+e)), r = pi / pi_old, w a per-token
    weight (truncated_is_weights; 1: none); with the clip fraction and the approximate KL to the rollout
    policy (k3)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped) * weights, mask)
    with torch.no_grad():
        stats = {"clip_fraction": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(torch.expm1(-log_ratio) + log_ratio, mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect, 0: no better than the mean)."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_diff / var_returns) if var_returns > 0 else float("nan")


class FixedKL:
    """A constant KL coefficient."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state(self) -> dict:
        return {"beta": self.beta}


class AdaptiveKL(FixedKL):
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, steering the
    measured KL towards the target."""

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon


# ppo.kl_controller: name -> fn(the ppo config) -> a controller holding beta.
KL_CONTROLLERS: dict[str, Callable] = {
    "fixed": lambda ppo: FixedKL(ppo.kl_coef),
    "adaptive": lambda ppo: AdaptiveKL(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon),
}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each categorical distribution over the last dimension."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def ptx_rows_per_rank(ppo) -> int:
    """The packed LM rows one learner rank takes a step under PPO-ptx: ptx_micro_batch for each of its updates
    (ppo.epochs passes over its share of the responses, a minibatch an update)."""
    share, micro = ppo.prompts_per_step * ppo.samples_per_prompt // ppo.learner.num, ppo.minibatch // ppo.learner.num
    return ppo.epochs * (share // micro) * ppo.ptx_micro_batch
