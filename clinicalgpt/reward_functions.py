"""Reward functions: the rules and users' own Python callables that ppo.reward can name instead of the
reward model (`model`). Each entry builds, from the text after the colon, a function

    score(prompts: list[str], responses: list[str], response_ids: list[list[int]]) -> list[float]

one score per response (prompts as the model saw them, chat template included; special tokens removed).
Adding a rule is one function and one name:

    @reward_function("mentions")
    def mentions(arg): return lambda prompts, responses, response_ids: [float(arg in r) for r in responses]

A user's callable needs no registration: ppo.reward=python:my_module:fn, with fn(prompts, responses) ->
one float per response. The reward actor imports my_module, so it must be importable on the cluster (in
the job's --working-dir, or an installed package).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

REWARD_FUNCTIONS: dict[str, Callable[[str], Callable]] = {}


def reward_function(name: str):
    def register(make):
        REWARD_FUNCTIONS[name] = make
        return make
    return register


@reward_function("length")
def length(arg: str):
    """-|response tokens - n| / n: a rule a tiny model can learn quickly."""
    if not arg.isdigit():
        raise ValueError(f"length takes a number of tokens, e.g. length:16 (got {arg!r})")
    target = int(arg)
    return lambda prompts, responses, response_ids: [-abs(len(ids) - target) / target for ids in response_ids]


@reward_function("contains")
def contains(arg: str):
    """1 if the response contains the text, else 0."""
    return lambda prompts, responses, response_ids: [float(arg in r) for r in responses]


@reward_function("python")
def python_callable(arg: str):
    """A user's fn(prompts, responses) -> one float per response, named module:function."""
    module, _, name = arg.partition(":")
    if not module or not name:
        raise ValueError(f"python takes module:function, e.g. python:my_rewards:score (got {arg!r})")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {name} from {module}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{module}.{name} is not callable")

    def score(prompts, responses, response_ids):
        scores = [float(s) for s in fn(prompts, responses)]
        if len(scores) != len(responses) or not all(math.isfinite(s) for s in scores):
            raise ValueError(f"{module}.{name} must return one finite number per response: got {len(scores)} "
                             f"values for {len(responses)} responses")
        return scores
    return score


def parse_reward(spec: str) -> tuple[str, str]:
    """ppo.reward -> (kind, arg): ("model", "") or a REWARD_FUNCTIONS name and its argument."""
    kind, _, arg = spec.partition(":")
    if kind == "model" and not arg or kind in REWARD_FUNCTIONS and arg:
        return kind, arg
    raise ValueError(f"ppo.reward={spec!r}: expected model or one of "
                     + ", ".join(f"{k}:<arg>" for k in REWARD_FUNCTIONS))


def reward_function_for(spec: str) -> Callable:
    """The score function ppo.reward names (not `model`); a clear ValueError when it cannot be built."""
    kind, arg = parse_reward(spec)
    try:
        return REWARD_FUNCTIONS[kind](arg)
    except ValueError as e:
        raise ValueError(f"ppo.reward={spec!r}: {e}") from None
