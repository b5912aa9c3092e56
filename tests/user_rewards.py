"""A user's reward functions, as ppo.reward=python:<module>:<function> names them: fn(prompts, responses)
-> one float per response. The tests name this module as `user_rewards` in-process (tests/ is on pytest's
path) and as `tests.user_rewards` under `ray job submit --working-dir <repo>`."""

import os


def answer_length(prompts: list[str], responses: list[str]) -> list[float]:
    """-|characters - n| / n: prefers answers of about n characters, n = $ANSWER_CHARS (12 if unset; a
    setting that reaches the reward actor through the job's runtime env)."""
    n = int(os.environ.get("ANSWER_CHARS", "12"))
    return [-abs(len(r) - n) / n for r in responses]


def one_score_too_few(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * (len(responses) - 1)
