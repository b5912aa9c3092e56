"""How far a benchmark's learner is from this machine's limit: the matrix-multiply FLOPs of one training pass of
the model (torch.utils.flop_counter, forward and backward, in the dtype it trains in), against the rate at which
this machine runs those same matrix multiplies (their shapes and dtype, the learner's threads), measured in the same
run. Attention's score products run inside scaled_dot_product_attention, which the counter does not see on CPUs:
the FLOPs, and so the share of the limit, are a lower bound there.

Generation's limit is memory bandwidth instead: each decoding step reads every weight once for the whole batch and
each sequence's keys and values so far. Its tokens/s bound is the batch over the time to read those bytes at this
machine's read bandwidth, measured in the same run with the engine's threads (prefill, compute-bound, not counted:
an upper bound for decoding). A model whose weights fit in the caches can beat it; the tiny preset's 20 MB do.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from clinicalgpt.plan import DTYPE_BYTES, Model

MATMULS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.bmm.default: (0, 1)}


class MatmulShapes(TorchDispatchMode):
    """The (left shape, right shape, dtype) of every matrix multiply run under it."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            left, right = (args[i] for i in MATMULS[func])
            self.calls[(tuple(left.shape), tuple(right.shape), left.dtype)] += 1
        return func(*args, **(kwargs or {}))


def matmul_flops(left: tuple, right: tuple) -> int:
    return 2 * math.prod(left) * right[-1]  # [..., M, K] @ [..., K, N]


def training_pass(model, input_ids: torch.Tensor, bf16: bool) -> tuple[int, Counter]:
    """FLOPs and matrix multiplies of one forward and backward pass of a causal LM on input_ids (labels = the ids;
    the gradients are dropped after)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with FlopCounterMode(display=False) as flops, MatmulShapes() as shapes:
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return flops.get_total_flops(), shapes.calls


def matmul_peak(calls: Counter, threads: int, seconds: float = 2.0) -> float:
    """FLOP/s of this machine on exactly these matrix multiplies, each repeated for about `seconds` / len(calls)
    after a warm-up, with `threads` threads: the most a learner doing only them could reach."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        total_flops, total_time = 0.0, 0.0
        for (left, right, dtype), count in calls.items():
            a, b = torch.randn(left, dtype=dtype), torch.randn(right, dtype=dtype)
            torch.matmul(a, b)
            runs, started = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - started < seconds / len(calls):
                torch.matmul(a, b)
                runs += 1
            total_time += count * (time.perf_counter() - started) / runs
            total_flops += count * matmul_flops(left, right)
        return total_flops / total_time
    finally:
        torch.set_num_threads(before)


def learner_limit(model, batch: int, seq_len: int, bf16: bool, threads: int) -> dict:
    """FLOPs per trained token of the model (a full batch x seq_len pass) and this machine's peak on its matrix
    multiplies: {"flops_per_token", "peak_flops"}."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    flops, calls = training_pass(model, ids, bf16)
    return {"flops_per_token": flops / ids.numel(), "peak_flops": matmul_peak(calls, threads)}


def limit_columns(tokens_per_s: float, limit: dict) -> dict:
    achieved = tokens_per_s * limit["flops_per_token"]
    return {"gflops": achieved / 1e9, "of_peak": achieved / limit["peak_flops"]}


def read_bandwidth(threads: int, megabytes: int = 1024, seconds: float = 2.0) -> float:
    """Bytes per second this machine reads from memory with `threads` threads: sums over a tensor far larger than
    its caches, after a warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        data.sum()
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < seconds:
            data.sum()
            runs += 1
        return runs * data.numel() * data.element_size() / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)


def decode_limit(weight_bytes: int, kv_bytes_per_token: int, batch: int, context: float, bandwidth: float) -> float:
    """Tokens/s at most, decoding `batch` sequences of `context` tokens on average: each step reads the weights
    once and each sequence's keys and values."""
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token
    return batch * bandwidth / step_bytes


def decode_bytes(model_path: str, dtype: str) -> tuple[int, int]:
    """(bytes of the model's weights, bytes of keys and values a token) in `dtype`, from its config.json."""
    model, w = Model(AutoConfig.from_pretrained(model_path)), DTYPE_BYTES[dtype]
    return model.parameters()["all"] * w, model.kv_bytes_per_token(w)
