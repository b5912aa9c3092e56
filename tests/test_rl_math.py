"""The RL math against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from clinicalgpt import rl
from clinicalgpt.config import load_config

T = torch.tensor


def close(a, b, tol=1e-5):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol), (a, b)


def test_kl_estimators():
    logp, ref = T([-1.0]), T([-1.5])  # log r = 0.5
    close(rl.kl_per_token(logp, ref, "k1"), [0.5])
    close(rl.kl_per_token(logp, ref, "k2"), [0.125])  # 0.5^2 / 2
    close(rl.kl_per_token(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5])  # 0.1065307
    close(rl.kl_per_token(ref, ref, "k3"), [0.0])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        rl.kl_per_token(logp, ref, "k4")


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = T([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = rl.token_rewards(T([2.0, -1.0]), kl, mask, beta=0.5)
    # -0.5 * kl everywhere; +2 on column 2 of row 0, -1 on column 1 of row 1 (its last real token).
    close(rewards, [[-0.05, -0.1, -0.15 + 2.0], [-0.2, -0.25 - 1.0, 0.0]])


def test_gae_on_short_sequences_with_masks():
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = T([[0.5, 0.6, 0.7], [0.5, 1.0, 9.9]])  # 9.9 sits on padding and must be ignored
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d2 = 1 - 0.7 = 0.3; d1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.5 * 0.3 = 0.25; d0 = 0.1, A0 = 0.225
    close(adv[0], [0.225, 0.25, 0.3])
    close(ret[0], [0.725, 0.85, 1.0])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # row 1: A1 = 2 + 0 - 1 = 1; A0 = (0 + 0.9 * 1.0 - 0.5) + 0.9 * 0.95 * 1 = 1.255; padding 0
    close(adv[1], [1.255, 1.0, 0.0])
    close(ret[1], [1.755, 2.0, 0.0])


def test_whiten_uses_only_masked_entries():
    out = rl.whiten(T([1.0, 2.0, 3.0, 100.0]), T([1.0, 1.0, 1.0, 0.0]))
    s = math.sqrt(2 / 3)  # mean 2, population variance 2/3
    close(out, [-1 / s, 0.0, 1 / s, 0.0], tol=1e-4)


def test_group_advantages():
    returns = T([1.0, 2.0, 3.0, 5.0])  # two prompts, two samples each
    # grpo: [1, 2] -> mean 1.5, sample std 0.7071; [3, 5] -> mean 4, std 1.4142
    close(rl.group_advantages(returns, 2, "grpo"), [-0.70710, 0.70710, -0.70710, 0.70710], tol=1e-4)
    # rloo: R minus the other sample: 1 - 2, 2 - 1, 3 - 5, 5 - 3
    close(rl.group_advantages(returns, 2, "rloo"), [-1.0, 1.0, -2.0, 2.0])
    for estimator in ("grpo", "rloo"):  # one sample: no std (grpo would give NaN), no other samples
        with pytest.raises(ValueError, match=f"{estimator} needs at least 2 samples per prompt"):
            rl.group_advantages(returns, 1, estimator)


def test_group_advantages_are_not_whitened_again():
    from clinicalgpt.rlhf.step import advantages
    cfg = load_config(["ppo.samples_per_prompt=2", "ppo.advantage=grpo"])  # ppo.whiten_advantages stays on
    zeros = torch.zeros(4, 3)
    scored = {"scores": T([2.0, 2.0, 1.0, 3.0]), "old_logprobs": zeros, "ref_logprobs": zeros}
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    adv = advantages(cfg, scored, mask, beta=0.1)["advantages"]
    # Prompt 0's samples scored alike (3 and 1 tokens long): 0 on every token. Prompt 1: [1, 3] -> -/+ 0.7071
    # (sample std sqrt(2)) on each token. A token-weighted whitening would move prompt 0's zeros by the mean
    # over tokens, (-0.7071 + 2 * 0.7071) / 7, there because prompt 1's better answer is the longer one.
    close(adv, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.70711, 0.0, 0.0], [0.70711, 0.70711, 0.0]], tol=1e-4)
    # gae whitens its own. KL 0, values 0, gamma = lam = 1: the return to go, 2 2 2 | 2 | 1 1 | 3 3 over the
    # 8 tokens: mean 2, population variance 4/8 -> (R - 2) / sqrt(0.5)
    cfg = load_config(["ppo.gamma=1.0", "ppo.lam=1.0"])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = advantages(cfg, {**scored, "old_values": zeros}, mask, beta=0.1)["advantages"]
    close(adv, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.41421, -1.41421, 0.0], [1.41421, 1.41421, 0.0]], tol=1e-4)


def test_truncated_importance_weights_and_the_policy_loss_they_weight():
    old = T([[math.log(0.5), math.log(0.3), math.log(0.2), 0.0]])
    engine = T([[math.log(0.4), math.log(0.1), math.log(0.25), 5.0]])  # the last column is padding
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    weights, stats = rl.truncated_is_weights(old, engine, mask, cap=2.0)
    # pi_old / pi_engine = 0.5 / 0.4 = 1.25; 0.3 / 0.1 = 3 -> capped at 2; 0.2 / 0.25 = 0.8
    close(weights[:, :3], [[1.25, 2.0, 0.8]])
    assert stats["tis_weight"] == pytest.approx((1.25 + 2.0 + 0.8) / 3)  # 1.35
    assert stats["tis_truncated_tokens"] == pytest.approx(1 / 3)
    # The ratios 1.5, 0.5 and 1 against the learner's old log-probs, A = 1, clip 0.2: per-token losses -1.2
    # (clipped), -0.5, -1 (test_ppo_clip_policy_loss), each times its weight: (-1.5 - 1.0 - 0.8) / 3 = -1.1
    logp = old + T([[math.log(1.5), math.log(0.5), 0.0, 0.0]])
    loss, _ = rl.policy_loss(logp, old, torch.ones(1, 4), mask, clip=0.2, weights=weights)
    close(loss, -1.1)
    # The weights are constants: the gradient is w * d(loss term), here d(-A r)/d logp = -r on the unclipped tokens.
    logp.requires_grad_(True)
    rl.policy_loss(logp, old, torch.ones(1, 4), mask, clip=0.2, weights=weights)[0].backward()
    close(logp.grad, [[0.0, -2.0 * 0.5 / 3, -0.8 * 1.0 / 3, 0.0]])


def test_a_truncated_response_scores_the_set_score():
    scores, truncated = T([0.7, -0.2, 1.5]), torch.tensor([False, True, True])
    close(rl.response_scores(scores, truncated, None), [0.7, -0.2, 1.5])  # off: the reward's own scores
    close(rl.response_scores(scores, truncated, -1.0), [0.7, -1.0, -1.0])
    # And on the last token of each response, beside -beta * KL (beta 0.5, KL 0.2 per token):
    mask = T([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    rewards = rl.token_rewards(rl.response_scores(scores, truncated, -1.0), torch.full((3, 2), 0.2) * mask, mask, 0.5)
    close(rewards, [[-0.1, -0.1 + 0.7], [-0.1 - 1.0, 0.0], [-0.1, -0.1 - 1.0]])



def test_a_degenerate_response_scores_the_set_score_cut_or_not():
    scores, truncated = T([0.7, -0.2, 1.5, 0.3]), torch.tensor([False, True, True, False])
    degenerate = torch.tensor([False, False, True, True])
    close(rl.response_scores(scores, truncated, None, degenerate=degenerate), [0.7, -0.2, 1.5, 0.3])  # off
    close(rl.response_scores(scores, truncated, None, degenerate=degenerate, degenerate_score=-2.0),
          [0.7, -0.2, -2.0, -2.0])
    # Both set: the cut response takes truncated_score, the degenerate ones (cut or not) degenerate_score.
    close(rl.response_scores(scores, truncated, -1.0, degenerate=degenerate, degenerate_score=-2.0),
          [0.7, -1.0, -2.0, -2.0])


def test_the_length_penalty_takes_the_responses_share_of_the_token_limit():
    scores, truncated, lengths = T([0.7, -0.2, 1.5]), torch.tensor([False, False, True]), torch.tensor([8, 24, 48])
    # penalty 0.5, limit 48 tokens: 0.7 - 0.5 * 8/48, -0.2 - 0.5 * 24/48; the truncated one takes truncated_score.
    close(rl.response_scores(scores, truncated, -1.0, lengths, 0.5, 48), [0.7 - 0.5 / 6, -0.2 - 0.25, -1.0])
    close(rl.response_scores(scores, truncated, None, lengths, 0.5, 48), [0.7 - 0.5 / 6, -0.45, 1.5 - 0.5])
    close(rl.response_scores(scores, truncated, None, lengths, 0.0, 48), [0.7, -0.2, 1.5])  # off


def test_ppo_clip_policy_loss():
    old = T([[0.0, 0.0]])
    logp = T([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    mask = T([[1.0, 1.0]])
    loss, stats = rl.policy_loss(logp, old, T([[1.0, 1.0]]), mask, clip=0.2)
    # A = 1: token 0 max(-1.5, -1.2) = -1.2 (clipped); token 1 max(-0.5, -0.8) = -0.5 -> mean -0.85
    close(loss, -0.85)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    # k3 per token: 1/1.5 - 1 + ln 1.5 = 0.072132; 2 - 1 + ln 0.5 = 0.306853
    assert stats["approx_kl"] == pytest.approx((0.072132 + 0.306853) / 2, abs=1e-5)
    loss, stats = rl.policy_loss(logp, old, T([[-1.0, -1.0]]), mask, clip=0.2)
    # A = -1: token 0 max(1.5, 1.2) = 1.5; token 1 max(0.5, 0.8) = 0.8 (clipped) -> 1.15
    close(loss, 1.15)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_clipped_value_loss():
    values, old, returns = T([[1.0, 3.0]]), T([[0.0, 2.9]]), T([[2.0, 2.0]])
    # clipped values: 0 + clip(1, -0.5, 0.5) = 0.5; 2.9 + 0.1 = 3.0
    # max((1-2)^2, (0.5-2)^2) = 2.25; max(1, 1) = 1 -> 0.5 * mean = 0.8125
    close(rl.value_loss(values, old, returns, T([[1.0, 1.0]]), clip=0.5), 0.8125)


def test_explained_variance():
    # Var(R) = 2/3; R - V = [0, 0, 1], Var = 2/9 -> 1 - (2/9) / (2/3) = 2/3
    ev = rl.explained_variance(T([[1.0, 2.0, 2.0, 7.0]]), T([[1.0, 2.0, 3.0, 0.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    assert ev == pytest.approx(2 / 3, abs=1e-6)


def test_ppo_advantage_names_an_estimator_and_whether_it_trains_a_critic():
    ppo = load_config(["ppo.samples_per_prompt=2", "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.whiten_advantages=false"]).ppo
    rewards, mask = T([[0.0, 1.0], [0.0, 3.0]]), T([[1.0, 1.0], [1.0, 1.0]])  # one prompt, two samples
    adv, returns = rl.ADVANTAGE_ESTIMATORS["rloo"](rewards, None, mask, ppo)
    close(adv, [[-2.0, -2.0], [2.0, 2.0]])  # 1 - 3 and 3 - 1 on every token
    assert returns is None and not rl.ADVANTAGE_ESTIMATORS["rloo"].uses_critic
    adv, returns = rl.ADVANTAGE_ESTIMATORS["gae"](rewards, T([[0.5, 0.5], [0.5, 0.5]]), mask, ppo)
    close(returns, [[1.0, 1.0], [3.0, 3.0]])  # gamma = lam = 1: the return to go
    close(adv, [[0.5, 0.5], [2.5, 2.5]])
    assert rl.ADVANTAGE_ESTIMATORS["gae"].uses_critic


def test_kl_controllers():
    ppo = load_config(["ppo.kl_coef=0.1", "ppo.kl_target=6.0", "ppo.kl_horizon=10000"]).ppo
    fixed = rl.KL_CONTROLLERS["fixed"](ppo)
    fixed.update(100.0, 64)
    assert fixed.beta == 0.1
    adaptive = rl.KL_CONTROLLERS["adaptive"](ppo)
    adaptive.update(12.0, 64)  # KL / target - 1 = 1, clipped to 0.2: beta *= 1 + 0.2 * 64 / 10000
    assert adaptive.beta == pytest.approx(0.1 * 1.00128)
    adaptive.update(6.0 * 0.9, 64)  # error -0.1
    assert adaptive.beta == pytest.approx(0.1 * 1.00128 * (1 - 0.1 * 64 / 10000))


def test_entropy_from_logits():
    close(rl.entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    close(rl.entropy_from_logits(T([[0.0, -1e9]])), [0.0])


@pytest.mark.parametrize("bad, message", [("ppo.reward=lengthx", "expected model"),
                                          ("ppo.reward=python:no_such_module_anywhere:fn", "cannot import fn"),
                                          ("ppo.kl_estimator=k9", "one of k1, k2, k3"),
                                          ("ppo.kl_controller=nope", "one of fixed, adaptive"),
                                          ("ppo.advantage=a2c", "one of gae, grpo, rloo"),
                                          ("ppo.advantage=grpo ppo.samples_per_prompt=1",
                                           "ppo.advantage=grpo compares the samples of a prompt: it needs "
                                           "ppo.samples_per_prompt >= 2, got 1"),
                                          ("ppo.advantage=rloo ppo.samples_per_prompt=1", "rloo compares the samples"),
                                          ("ppo.length_group=0", "must be >= 1")])
def test_bad_rl_settings_are_refused_before_anything_starts(tmp_path, bad, message):
    from clinicalgpt.rlhf.train import check_inputs
    sft = tmp_path / "tiny" / "sft" / "final"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=message):
        check_inputs(load_config([f"run_root={tmp_path}", "ppo.reward=length:8", *bad.split()]))


def test_ptx_takes_a_micro_batch_of_lm_rows_for_every_policy_update_of_a_rank():
    ppo = load_config([]).ppo  # 16 prompts x 4 samples over 2 ranks: 32 each; minibatch 16: 8 a rank; 2 epochs
    assert rl.ptx_rows_per_rank(ppo) == 2 * (32 // 8) * 1
    ppo = load_config(["ppo.ptx_micro_batch=2", "ppo.learner.num=4", "ppo.epochs=1"]).ppo  # 16 a rank, 4 an update
    assert rl.ptx_rows_per_rank(ppo) == 1 * (16 // 4) * 2
