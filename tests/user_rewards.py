"""A user's reward functions, as ppo.reward=python:<module>:<function> names them: fn(prompts, responses)
-> one float per response. The tests name this module as `user_rewards` in-process (tests/ is on pytest's
path) and as `tests.user_rewards` under `ray job submit --working-dir <repo>`."""


def answer_length(prompts: list[str], responses: list[str]) -> list[float]:
    """-|characters - 12| / 12: prefers answers of about 12 characters."""
    return [-abs(len(r) - 12) / 12 for r in responses]


def one_score_too_few(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * (len(responses) - 1)
