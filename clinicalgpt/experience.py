"""Rollouts as model inputs, shared by every RLHF role: one row per (prompt, response), the prompt
left-padded to the batch's longest and the response right-padded, so that the logits predicting the
response sit in the same columns for every row.

    input_ids       [B, P + L]   pad | prompt | response | pad
    attention_mask  [B, P + L]
    response_mask   [B, L]       1 on generated tokens
    prompt_len      P            (an int in the dict)

Arrays are numpy so that batches travel through the object store without copies.
"""

from __future__ import annotations

import numpy as np
import torch

from .rl import entropy_from_logits


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    P = max(len(p) for p in prompts)
    L = max(1, max(len(r) for r in responses))
    ids = np.full((len(prompts), P + L), pad_id, dtype=np.int64)
    attention = np.zeros_like(ids)
    response_mask = np.zeros((len(prompts), L), dtype=np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P], ids[i, P:P + len(r)] = p, r
        attention[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response_mask, "prompt_len": P}


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Row shards of a batch (the last ones may be one row shorter), for several actors of a role."""
    bounds = np.linspace(0, len(batch["input_ids"]), parts + 1).astype(int)
    return [{k: v[a:b] if isinstance(v, np.ndarray) else v for k, v in batch.items()}
            for a, b in zip(bounds[:-1], bounds[1:])]


def model_inputs(batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (counting only real tokens, as in generation)."""
    ids = torch.as_tensor(batch["input_ids"], device=device)
    attention = torch.as_tensor(batch["attention_mask"], device=device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions}


def response_logprobs(model, batch: dict, device: torch.device | str = "cpu", with_entropy: bool = False):
    """log p(response token | everything before it) per response column, [B, L] (and the entropy of each
    predicting distribution when asked)."""
    inputs = model_inputs(batch, device)
    if getattr(model, "module", model).config.model_type == "bloom":
        inputs.pop("position_ids")  # ALiBi takes its positions from the attention mask
    P = batch["prompt_len"]
    logits = model(**inputs, use_cache=False).logits[:, P - 1:-1].float()
    targets = inputs["input_ids"][:, P:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp, entropy_from_logits(logits)) if with_entropy else logp


def _head_at_every_position(model, batch: dict, device) -> torch.Tensor:
    """A sequence classifier's backbone and scalar head applied at every position, [B, P + L]."""
    inner = model.module if hasattr(model, "module") else model  # a DeepSpeed engine
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PEFT model
    inputs = model_inputs(batch, device)
    if inner.config.model_type == "bloom":
        inputs.pop("position_ids")
    hidden = inner.base_model(**inputs, use_cache=False).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def sequence_scores(model, batch: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reward model's score of each (prompt, response): its head on the last real token."""
    last = batch["prompt_len"] + torch.as_tensor(batch["response_mask"]).sum(1).long() - 1
    return _head_at_every_position(model, batch, device)[torch.arange(len(last)), last.to(device)]


def token_values(critic, batch: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """The critic's value before each response token, [B, L] (the reward model's head at every position)."""
    P = batch["prompt_len"]
    return _head_at_every_position(critic, batch, device)[:, P - 1:-1]
