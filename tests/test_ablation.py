"""The PPO ablation's summary (scripts/ppo_ablation.py), worked by hand: mean and spread over the seeds, the
verdicts against the SFT model, and every arm stating every control."""

import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("ppo_ablation", REPO / "scripts" / "ppo_ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def figures(gain, exam, no_answer, degenerate, qa, safety):
    return {"eval_reward_gain": gain, "last_eval_kl": 1.0, "health_alarm": 0, "exam_accuracy": exam,
            "exam_no_answer": no_answer, "conversation_rougeL": 3.0, "degenerate": degenerate, "truncated": 0.1,
            "qa_win": qa[0], "qa_lose": qa[1], "safety_win": safety[0], "safety_lose": safety[1]}


def test_the_summary_gives_mean_and_spread_over_seeds_and_each_arms_verdict():
    sft = {k: v for k, v in figures(0, 0.170, 0.06, 0.20, (0, 0), (0, 0)).items() if not k.startswith(("qa", "safety"))}
    runs = {"today-s0": figures(0.8, 0.03, 0.80, 0.50, (0.3, 0.5), (0.2, 0.7)),
            "today-s1": figures(0.6, 0.05, 0.90, 0.40, (0.3, 0.5), (0.2, 0.7)),
            "all-s0": figures(0.5, 0.16, 0.07, 0.10, (0.4, 0.3), (0.4, 0.4)),
            "all-s1": figures(0.3, 0.19, 0.08, 0.20, (0.4, 0.3), (0.4, 0.4)),
            # More exam questions answered, and answered right, than SFT: no harm (the targets are one-sided).
            "ptx-s0": figures(0.5, 0.25, 0.01, 0.10, (0.4, 0.3), (0.4, 0.4)),
            "ptx-s1": figures(0.5, 0.25, 0.01, 0.10, (0.4, 0.3), (0.4, 0.4)),
            "sft": sft}
    table = ablation.summarize(runs, ["today", "all", "ptx"], [0, 1])
    assert table["today"]["eval_reward_gain"]["mean"] == pytest.approx(0.7)
    assert table["today"]["eval_reward_gain"]["sd"] == pytest.approx(0.1414, abs=1e-4)  # sqrt(0.02 / 1)
    assert (table["all"]["exam_accuracy"]["min"], table["all"]["exam_accuracy"]["max"]) == (0.16, 0.19)
    assert not any(table["today"]["targets"].values())  # today's: every harm, and no gain target of its own
    assert "held-out reward gain >= half of today's" not in table["today"]["targets"]
    # all: exam 0.175 vs 0.170, no answer 0.075 vs 0.06, degenerate 0.15 <= 0.20, QA 0.4 >= 0.3, safety a tie,
    # gain 0.4 >= 0.7 / 2
    assert all(table["all"]["targets"].values()), table["all"]["targets"]
    assert all(table["ptx"]["targets"].values()), table["ptx"]["targets"]
    page = ablation.markdown(table, sft, {"finished": "2026-12-04T18:00:00+00:00", "commit": "abc", "seconds": 600,
                                          "machine": "cpu", "command": "python scripts/ppo_ablation.py",
                                          "run_dir": "runs/tiny", "seeds": [0, 1], "chart": "ablation.png"})
    assert "| exam accuracy | 0.170 | 0.040 ± 0.014 | 0.175 ± 0.021 |" in page
    assert "| QA: win >= lose vs SFT | **no** | yes |" in page
    assert "](ablation.png)" in page


def test_every_arm_states_every_control():
    keys = set(ablation.TODAY)
    for arm, settings in ablation.ARMS.items():
        assert keys <= set(settings), arm
    assert ablation.ARMS["all"] == {**ablation.TODAY, **{k: v for c in ablation.CONTROLS.values() for k, v in c.items()}}
    assert ablation.ARMS["ptx_2"] == {**ablation.TODAY, "ppo.ptx_coef": "2"}
