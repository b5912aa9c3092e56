"""Output health: the shares of empty, cut-off and degenerate answers, worked out by hand, and the PPO
warning when the held-out answers fall past their limits against the SFT policy's."""

import pytest

from clinicalgpt.evaluation import metrics


def test_output_health_by_hand():
    # "小儿治疗、" three times: 15 characters, 12 4-grams, 5 of them distinct -> 7/12 repeated, degenerate (> 0.5).
    assert metrics.repeated_share("小儿治疗、小儿治疗、小儿治疗、") == pytest.approx(7 / 12)
    assert metrics.repeated_share("头痛三天") == 0.0 and metrics.repeated_share("头痛") == 0.0  # too short: none
    # distinct-1 over "发热发" and "热": characters 发 热 发 热, 2 distinct of 4; distinct-2: 发热 热发 (2 of 2).
    assert metrics.distinct_n(["发热发", "热"], 1) == 0.5 and metrics.distinct_n(["发热发", "热"], 2) == 1.0
    answers = ["小儿治疗、小儿治疗、小儿治疗、", " \n", "答案：B。支气管哮喘", "头痛三天"]
    h = metrics.output_health(answers, truncated=[True, False, False, True], compliant=[False, False, True, False])
    assert h["empty"] == 0.25 and h["degenerate"] == 0.5 and h["truncated"] == 0.5 and h["compliant"] == 0.25
    assert h["repeated"] == pytest.approx((7 / 12) / 4)  # the others repeat none of their 4-grams
    chars = "小儿治疗、" * 3 + "答案：B。支气管哮喘" + "头痛三天"  # whitespace dropped
    assert h["distinct1"] == pytest.approx(len(set(chars)) / len(chars))
    assert set(metrics.output_health(["x"])) == {"empty", "degenerate", "repeated", "distinct1", "distinct2"}


def test_a_held_out_share_past_its_limit_over_the_sft_policy_is_a_health_warning():
    from clinicalgpt.rlhf.log import health_warnings
    sft = {"step": 0, "eval_empty": 0.05, "eval_degenerate": 0.10, "eval_truncated": 0.20, "eval_exam_compliant": 0.9}
    within = {"step": 10, "eval_empty": 0.15, "eval_degenerate": 0.30, "eval_truncated": 0.50, "eval_exam_compliant": 0.7}
    assert health_warnings(within, sft) == []  # every change at most its limit
    # degenerate +0.25 (limit 0.2), truncated +0.35 (0.3), exam letters -0.3 (-0.2); empty +0.05 is within its 0.1.
    row = {"step": 20, "eval_empty": 0.10, "eval_degenerate": 0.35, "eval_truncated": 0.55, "eval_exam_compliant": 0.6}
    assert health_warnings(row, sft) == ["degenerate answers 0.10 -> 0.35", "truncated answers 0.20 -> 0.55",
                                         "exam_compliant answers 0.90 -> 0.60"]
    assert health_warnings({"step": 20, "eval_exam_compliant": 1.0}, sft) == []  # a rise in compliance is no harm
