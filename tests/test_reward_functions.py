"""Reward functions (ppo.reward other than model): the rules by hand, a user's Python callable, the errors
a bad one gets, and the reward actor scoring decoded responses with one."""

from pathlib import Path

import numpy as np
import pytest

from clinicalgpt.experience import build_batch
from clinicalgpt.reward_functions import reward_function_for
from clinicalgpt.tokenizer import save_tokenizer, train_tokenizer


def test_rules_and_a_user_function_score_each_response_by_hand():
    length = reward_function_for("length:4")
    assert length(["q", "q"], ["", ""], [[5, 6, 7, 8], [5, 6]]) == [0.0, -0.5]  # |4-4|/4, -|2-4|/4
    contains = reward_function_for("contains:医生")
    assert contains(["q", "q"], ["请尽快看医生", "多喝水"], [[], []]) == [1.0, 0.0]
    user = reward_function_for("python:user_rewards:answer_length")
    assert user(["q", "q"], ["a" * 6, "a" * 12], [[], []]) == [-0.5, 0.0]  # -|6-12|/12, 0


@pytest.mark.parametrize("spec, message", [
    ("python:user_rewards:no_such_function", "cannot import no_such_function from user_rewards"),
    ("python:no_such_module_anywhere:fn", "cannot import fn from no_such_module_anywhere"),
    ("python:user_rewards", "python takes module:function"),
    ("length:long", "length takes a number of tokens"),
    ("judge:gpt", "expected model or one of length:<arg>, contains:<arg>, python:<arg>"),
])
def test_a_reward_that_cannot_be_built_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        reward_function_for(spec)


def test_a_user_function_must_return_one_finite_score_per_response():
    score = reward_function_for("python:user_rewards:one_score_too_few")
    with pytest.raises(ValueError, match="one finite number per response: got 1 values for 2 responses"):
        score(["q", "q"], ["a", "b"], [[], []])


def test_the_reward_actor_gives_a_user_function_the_decoded_prompts_and_responses(ray_session, tmp_path):
    from actors.reward import RewardActor
    tok = train_tokenizer(["高血压患者可以吃党参吗？", "建议低盐饮食，按时服药。"] * 20, vocab_size=300)
    save_tokenizer(tok, str(tmp_path), "qwen2")
    answers = ["建议低盐饮食", "按时服药。按时服药。"]  # 6 and 10 characters
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    batch = build_batch([tok("高血压？")["input_ids"]] * 2, [i + [tok.eos_token_id] for i in ids], tok.pad_token_id)
    # The module must be importable where the actor runs (a job's --working-dir puts it there).
    on_path = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}
    actor = RewardActor.options(runtime_env=on_path).remote("python:user_rewards:answer_length", str(tmp_path),
                                                            "float32", 8)
    scores = ray_session.get(actor.score.remote(batch))
    ray_session.kill(actor)
    np.testing.assert_allclose(scores, [-6 / 12, -2 / 12])  # the end-of-text token is not part of the text
