"""RewardActor: one scalar per response, from the trained reward model or from a reward function
(clinicalgpt/reward_functions.py: a rule, or a user's Python callable).

    ppo.reward=model                 the reward model (runs/<preset>/rm/final)
    ppo.reward=length:<n>            -|response tokens - n| / n: a rule a tiny model can learn quickly
    ppo.reward=contains:<text>       1 if the response contains <text>, else 0
    ppo.reward=python:<module>:<fn>  fn(prompts, responses) -> one float per response
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from clinicalgpt.experience import by_length, sequence_scores
from clinicalgpt.reward_functions import parse_reward, reward_function_for


@ray.remote
class RewardActor:
    def __init__(self, spec: str, model_path: str, dtype: str, forward_rows: int):
        from clinicalgpt.tokenizer import load_tokenizer
        self.kind, _ = parse_reward(spec)
        self.forward_rows = forward_rows
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path)
        if self.kind == "model":
            from transformers import AutoModelForSequenceClassification
            from clinicalgpt.modeling import DTYPES
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, dtype=DTYPES[dtype]).to(self.device).eval()
        else:
            self.function = reward_function_for(spec)  # imported here, in the actor's process and working dir

    def score(self, batch: dict) -> np.ndarray:
        if self.kind == "model":
            with torch.no_grad():
                return by_length(lambda b: sequence_scores(self.model, b, self.device).cpu().numpy(), batch,
                                 self.forward_rows)
        P = batch["prompt_len"]
        prompt_ids = [row[:P][mask[:P] > 0] for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        response_ids = [row[P:P + int(n)].tolist() for row, n in zip(batch["input_ids"], batch["response_mask"].sum(1))]
        prompts, responses = (self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                              for ids in (prompt_ids, response_ids))
        return np.array(self.function(prompts, responses, response_ids), dtype=np.float32)
