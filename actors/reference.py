"""ReferenceActor: the frozen SFT policy; log-probs of the response tokens, for the KL penalty."""

from __future__ import annotations

import numpy as np
import ray
import torch

from clinicalgpt.experience import by_length, response_logprobs


@ray.remote
class ReferenceActor:
    def __init__(self, model_path: str, dtype: str, forward_rows: int):
        from clinicalgpt.modeling import load_model
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, dtype).to(self.device).eval()
        self.forward_rows = forward_rows

    def logprobs(self, batch: dict, temperature: float) -> np.ndarray:
        """At the sampling temperature, as the policy's (0: greedy, scored at 1): the KL compares the two
        distributions the tokens could have been sampled from."""
        with torch.no_grad():
            return by_length(lambda b: response_logprobs(self.model, b, self.device, temperature=temperature)
                             .cpu().numpy(), batch, self.forward_rows)
