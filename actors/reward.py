"""RewardActor: one scalar per response, from the trained reward model or from a verifiable rule.

    ppo.reward=model               the reward model (runs/<preset>/rm/final)
    ppo.reward=length:<n>          -|response tokens - n| / n: a rule a tiny model can learn quickly
    ppo.reward=contains:<text>     1 if the response contains <text>, else 0
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from clinicalgpt.experience import by_length, sequence_scores


def parse_reward(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind == "model" and not arg or kind in ("length", "contains") and arg:
        if kind == "length" and not arg.isdigit():
            raise ValueError(f"ppo.reward={spec!r}: length takes a number of tokens, e.g. length:16")
        return kind, arg
    raise ValueError(f"ppo.reward={spec!r}: expected model, length:<tokens> or contains:<text>")


@ray.remote
class RewardActor:
    def __init__(self, spec: str, model_path: str, dtype: str, forward_rows: int):
        from clinicalgpt.tokenizer import load_tokenizer
        self.kind, self.arg = parse_reward(spec)
        self.forward_rows = forward_rows
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path)
        if self.kind == "model":
            from transformers import AutoModelForSequenceClassification
            from clinicalgpt.modeling import DTYPES
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, dtype=DTYPES[dtype]).to(self.device).eval()

    def score(self, batch: dict) -> np.ndarray:
        if self.kind == "model":
            with torch.no_grad():
                return by_length(lambda b: sequence_scores(self.model, b, self.device).cpu().numpy(), batch,
                                 self.forward_rows)
        lengths = batch["response_mask"].sum(1)
        if self.kind == "length":
            target = int(self.arg)
            return (-np.abs(lengths - target) / target).astype(np.float32)
        P = batch["prompt_len"]
        texts = self.tokenizer.batch_decode([row[P:P + int(n)] for row, n in zip(batch["input_ids"], lengths)],
                                            skip_special_tokens=True)
        return np.array([float(self.arg in t) for t in texts], dtype=np.float32)
