"""Rollout batches: trimming the padding and scoring in length-sorted chunks change no number; log-probs at
the sampling temperature; a reward model read in PPO where its training reads it."""

import math
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

from clinicalgpt.experience import (build_batch, by_length, length_grouped_minibatches, length_order, response_logprobs,
                                    sequence_scores, take_rows, token_values, trim)
from clinicalgpt.reward_model import scores as reward_model_scores

PAD = 0
PROMPTS = [[5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15], [16], [17, 18, 19, 20]]
RESPONSES = [[21, 22, 23], [24], [25, 26], [27, 28, 29, 30, 31], [32]]


def tiny_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=48, pad_token_id=PAD, num_labels=1)


def test_trim_drops_only_all_pad_columns():
    batch = build_batch([[5, 6], [7, 8, 9]], [[1], [2, 3]], PAD)
    # Padded: P = 3, L = 2; a third response column would be all pad, as would a fourth prompt column.
    wide = build_batch([[5, 6], [7, 8, 9], [1, 2, 3, 4]], [[1], [2, 3], [4, 5, 6]], PAD)
    narrow = trim({k: v[:2] if isinstance(v, np.ndarray) else v for k, v in wide.items()})
    assert narrow["prompt_len"] == 3
    for key in ("input_ids", "attention_mask", "response_mask"):
        np.testing.assert_array_equal(narrow[key], batch[key])


def test_scoring_a_trimmed_length_sorted_batch_equals_scoring_it_whole():
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_config()).eval()
    critic = AutoModelForSequenceClassification.from_config(tiny_config()).eval()
    batch = build_batch(PROMPTS, RESPONSES, PAD)
    P, mask = batch["prompt_len"], torch.as_tensor(batch["response_mask"])
    ids, attention = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():  # the whole padded batch, by hand
        logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, P - 1:-1]
        expected_logp = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1) * mask
        hidden = critic.model(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
        head = critic.score(hidden).squeeze(-1)
        expected_values = head[:, P - 1:-1] * mask
        expected_scores = head[torch.arange(len(ids)), P + mask.sum(1).long() - 1]

        logp = by_length(lambda b: response_logprobs(policy, b).numpy(), batch, chunk_rows=2)
        values = by_length(lambda b: token_values(critic, b).numpy(), batch, chunk_rows=2)
        scores = by_length(lambda b: sequence_scores(critic, b).numpy(), batch, chunk_rows=2)
    np.testing.assert_allclose(logp * batch["response_mask"], expected_logp.numpy(), atol=1e-5)
    np.testing.assert_allclose(values * batch["response_mask"], expected_values.numpy(), atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)
    assert logp.shape == batch["response_mask"].shape


def test_length_grouped_minibatches_pad_less_and_cover_each_row_once():
    rng = np.random.default_rng(0)
    # Long-tailed prompt lengths like the real PPO prompts' (median about 46 tokens, a tail past 150).
    prompts = [list(range(1, 1 + n)) for n in np.clip(rng.lognormal(3.8, 0.7, 32), 5, 250).astype(int)]
    batch = build_batch(prompts, [[1] * int(n) for n in rng.integers(1, 30, 32)], PAD)

    def padded_tokens(minibatches):
        return sum(trim(take_rows(batch, idx))["input_ids"].size for idx in minibatches)

    plain = length_grouped_minibatches(batch, 8, 1, np.random.default_rng(1))
    grouped = length_grouped_minibatches(batch, 8, 4, np.random.default_rng(1))
    for minibatches in (plain, grouped):
        assert [len(m) for m in minibatches] == [8] * 4
        assert sorted(np.concatenate(minibatches)) == list(range(32))
    # Grouped over all 32 rows, each minibatch is a run of the length order.
    order = list(length_order(batch))
    assert sorted(order.index(i) // 8 for i in grouped[0]) == [order.index(grouped[0][0]) // 8] * 8
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
    # A remainder that makes no whole minibatch is left out (every rank takes the same number of steps).
    assert len(length_grouped_minibatches(take_rows(batch, slice(0, 30)), 8, 2, rng)) == 3


class FixedLogits(torch.nn.Module):
    """A language model whose next-token logits are [0, ln 3] everywhere (a vocabulary of 2)."""
    config = SimpleNamespace(model_type="fixed")

    def forward(self, input_ids, logits_to_keep, **kwargs):
        return SimpleNamespace(logits=torch.tensor([0.0, math.log(3)]).expand(len(input_ids), logits_to_keep, 2))


def test_response_logprobs_are_those_of_the_sampling_temperature():
    batch = build_batch([[0, 1, 1]], [[1, 0]], PAD)
    logp, entropy = response_logprobs(FixedLogits(), batch, with_entropy=True, temperature=0.5)
    # logits / 0.5 = [0, 2 ln 3]: p = [1, 9] / 10; entropy -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.325083
    np.testing.assert_allclose(logp.numpy(), [[math.log(0.9), math.log(0.1)]], atol=1e-6)
    np.testing.assert_allclose(entropy.numpy(), [[0.325083, 0.325083]], atol=1e-6)
    # Temperature 1: p = [1, 3] / 4. Greedy decoding (temperature 0) is scored at 1.
    for temperature in (1.0, 0.0):
        logp = response_logprobs(FixedLogits(), batch, temperature=temperature)
        np.testing.assert_allclose(logp.numpy(), [[math.log(0.75), math.log(0.25)]], atol=1e-6)


def test_a_reward_model_whose_pad_is_its_eos_scores_ppo_responses_where_training_scored_replies():
    """Qwen2.5 base's pad token is its EOS (<|endoftext|>). The reward model is trained on prompt + reply +
    EOS, right-padded, and reads its score at the last token that is not the pad token: the reply's last,
    before the EOS. PPO reads a sampled response, which ends with the EOS the engine drew (or not, when the
    length limit cut it), at the same token."""
    eos = 3
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, pad_token_id=eos, eos_token_id=eos, num_labels=1)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[21, 22, eos], [23, 24, 25, 26]]  # the second one cut at the length limit: no EOS
    training_rows = torch.tensor([[5, 6, 7, 21, 22, eos, eos], [8, 9, 23, 24, 25, 26, eos]])
    with torch.no_grad():
        def head(ids: list[int]) -> torch.Tensor:  # the head at every position of one unpadded sequence
            return rm.score(rm.model(input_ids=torch.tensor([ids])).last_hidden_state)[0, :, 0]

        expected = [head([5, 6, 7, 21, 22])[-1], head([8, 9, 23, 24, 25, 26])[-1]]  # at 22 and at 26
        in_training = reward_model_scores(rm, training_rows, eos)
        in_ppo = sequence_scores(rm, build_batch(prompts, responses, eos))
        at_the_eos = head([5, 6, 7, 21, 22, eos])[-1]
    np.testing.assert_allclose(in_training.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(in_ppo.numpy(), expected, atol=1e-5)
    assert abs(float(at_the_eos - expected[0])) > 1e-3  # the response's last token, the EOS, would differ
