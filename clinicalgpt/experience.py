"""Rollouts as model inputs, shared by every RLHF role: one row per (prompt, response), the prompt
left-padded to the batch's longest and the response right-padded, so that the logits predicting the
response sit in the same columns for every row.

    input_ids       [B, P + L]   pad | prompt | response | pad
    attention_mask  [B, P + L]
    response_mask   [B, L]       1 on generated tokens
    prompt_len      P            (an int in the dict)

Arrays are numpy so that batches travel through the object store without copies. The forward passes
drop the columns that are padding in every row first (`trim`) and pad their outputs back to L, and the
scoring roles run long-tailed batches in chunks of similar length (`by_length`): prompts range from 20 to
250 tokens, so padding every row to the longest would spend most of the compute on pad tokens.
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
    return [take_rows(batch, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def trim(batch: dict) -> dict:
    """The batch without the columns that are padding in every row: left of its longest prompt and right
    of its longest response. Positions count real tokens only, so every result is unchanged."""
    P, L = batch["prompt_len"], batch["response_mask"].shape[1]
    first = int(batch["attention_mask"][:, :P].argmax(1).min())
    keep = max(1, int(batch["response_mask"].sum(1).max()))
    out = {k: (v[:, first:P + keep] if v.shape[1] == P + L else v[:, :keep])
           if isinstance(v, np.ndarray) and v.ndim == 2 else v for k, v in batch.items()}
    out["prompt_len"] = P - first
    return out


def take_rows(batch: dict, rows: np.ndarray | slice) -> dict:
    return {k: v[rows] if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def length_order(batch: dict) -> np.ndarray:
    """Row indices by prompt length, then response length."""
    return np.lexsort((batch["response_mask"].sum(1), batch["attention_mask"][:, :batch["prompt_len"]].sum(1)))


def by_length(fn, batch: dict, chunk_rows: int) -> np.ndarray:
    """fn (batch -> per-row numpy results) over chunks of rows of similar prompt and response length,
    the results put back in row order."""
    order = length_order(batch)
    out = np.concatenate([fn(take_rows(batch, order[i:i + chunk_rows])) for i in range(0, len(order), chunk_rows)])
    result = np.empty_like(out)
    result[order] = out
    return result


def length_grouped_minibatches(batch: dict, size: int, group: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled minibatches of `size` rows in which rows of similar length go together, so that each
    forward pass pads less: a random permutation cut into groups of `group` minibatches, each group put
    in length order before it is cut (as transformers' LengthGroupedSampler). group=1: plain random
    minibatches. Rows beyond the last whole minibatch are left out."""
    perm = rng.permutation(len(batch["input_ids"]))
    minibatches = []
    for start in range(0, len(perm), size * group):
        chunk = perm[start:start + size * group]
        chunk = chunk[length_order(take_rows(batch, chunk))]
        minibatches += [chunk[i:i + size] for i in range(0, len(chunk) - size + 1, size)]
    return [minibatches[i] for i in rng.permutation(len(minibatches))]


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def model_inputs(batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (counting only real tokens, as in generation)."""
    ids = torch.as_tensor(batch["input_ids"], device=device)
    attention = torch.as_tensor(batch["attention_mask"], device=device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at each target token: [B, T, V] logits and [B, T] targets -> [B, T]."""
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, batch: dict, device: torch.device | str = "cpu", with_entropy: bool = False,
                      temperature: float = 1.0):
    """log p(response token | everything before it) per response column, [B, L] (and the entropy of each
    predicting distribution when asked), padded back to L columns with zeros after trimming. p is the
    distribution the tokens were sampled from: softmax(logits / temperature), as the engines sample (the PPO
    ratio and the KL must compare the policy that sampled); greedy decoding (temperature 0) is scored at 1."""
    L = batch["response_mask"].shape[1]
    batch = trim(batch)
    inputs = model_inputs(batch, device)
    if getattr(model, "module", model).config.model_type == "bloom":
        inputs.pop("position_ids")  # ALiBi takes its positions from the attention mask
    P = batch["prompt_len"]
    # Only the columns that predict the response go through the vocabulary projection (logits_to_keep).
    responses = inputs["input_ids"].shape[1] - P
    logits = model(**inputs, use_cache=False, logits_to_keep=responses + 1).logits[:, :-1].float()
    logits = logits / (temperature or 1.0)
    targets = inputs["input_ids"][:, P:]
    logp = _pad_to(token_logprobs(logits, targets), L)
    return (logp, _pad_to(entropy_from_logits(logits), L)) if with_entropy else logp


def _head_at_every_position(model, batch: dict, device) -> torch.Tensor:
    """A sequence classifier's backbone and scalar head applied at every position of a trimmed batch."""
    inner = model.module if hasattr(model, "module") else model  # a DeepSpeed engine
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PEFT model
    inputs = model_inputs(batch, device)
    if inner.config.model_type == "bloom":
        inputs.pop("position_ids")
    hidden = inner.base_model(**inputs, use_cache=False).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def sequence_scores(model, batch: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reward model's score of each (prompt, response), read where its training reads it (reward_model.scores):
    both take the classifier's own pooling, transformers' rule of each row's last token that is not the pad
    token. That is the response's last token; where the pad token is the EOS (Qwen2.5 base: <|endoftext|>),
    the token before a closing EOS, as for the replies in training, which end with that EOS too."""
    batch = trim(batch)
    inputs = model_inputs(batch, device)
    if getattr(model, "module", model).config.model_type == "bloom":
        inputs.pop("position_ids")
    return model(**inputs, use_cache=False).logits[:, 0].float()


def token_values(critic, batch: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """The critic's value before each response token, [B, L] (the reward model's head at every position)."""
    L = batch["response_mask"].shape[1]
    batch = trim(batch)
    return _pad_to(_head_at_every_position(critic, batch, device)[:, batch["prompt_len"] - 1:-1], L)
