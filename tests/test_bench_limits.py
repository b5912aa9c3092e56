"""The benchmarks' limit column (bench/limits.py): matrix-multiply FLOPs counted by hand, the shapes it replays are
the work torch's flop counter counts, and the share of the peak."""

import sys

import pytest
import torch

from clinicalgpt.config import LoraSettings, ModelConfig
from clinicalgpt.modeling import apply_lora, build_model
from clinicalgpt.tokenizer import train_tokenizer
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from limits import (MatmulShapes, decode_limit, limit_columns, matmul_flops, matmul_peak,  # noqa: E402
                    read_bandwidth, training_pass)


def test_a_matrix_multiply_costs_two_flops_per_multiply_add():
    assert matmul_flops((4, 3), (3, 5)) == 2 * 4 * 3 * 5
    assert matmul_flops((2, 4, 3), (2, 3, 5)) == 2 * 2 * 4 * 3 * 5  # a batch of two


def test_a_linear_layer_is_one_recorded_multiply_of_its_shapes():
    with MatmulShapes() as shapes:
        torch.nn.Linear(3, 5)(torch.ones(4, 3))
    assert shapes.calls == {((4, 3), (3, 5), torch.float32): 1}


def test_the_replayed_multiplies_are_the_counted_flops_and_the_share_of_the_peak_follows():
    tokenizer = train_tokenizer(["发热咳嗽头痛阿莫西林胶囊布洛芬片呼吸内科"] * 50, vocab_size=300)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = apply_lora(build_model(mc, tokenizer), LoraSettings(r=4, targets=["q_proj", "v_proj"])).train()
    flops, calls = training_pass(model, torch.randint(0, len(tokenizer), (2, 16)), bf16=False)
    assert flops == sum(n * matmul_flops(left, right) for (left, right, _), n in calls.items()) > 0
    # LoRA: frozen weights get no weight gradient, so well under three times the forward pass's multiplies
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    forward = sum(2 * 2 * 16 * m.in_features * m.out_features for m in linear)  # 2 FLOPs x 32 tokens x in x out
    assert 1.5 * forward < flops < 2.5 * forward
    assert all(p.grad is None for p in model.parameters())
    assert matmul_peak(calls, threads=1, seconds=0.2) > 1e6
    assert limit_columns(100.0, {"flops_per_token": 1e9, "peak_flops": 2e11}) == pytest.approx(
        {"gflops": 100.0, "of_peak": 0.5})


def test_decoding_is_bounded_by_reading_the_weights_once_a_step_and_each_sequences_cache():
    # 20 MB of weights, 4 KB of keys and values a token, 16 sequences of 100 tokens: 20e6 + 16 x 100 x 4096 =
    # 26,553,600 bytes a step; at 10 GB/s, 376.6 steps/s of 16 tokens.
    assert decode_limit(20_000_000, 4096, 16, 100, 10e9) == pytest.approx(16 * 10e9 / 26_553_600)
    assert decode_limit(20_000_000, 4096, 1, 0, 10e9) == pytest.approx(500)  # one sequence: the weights alone
    assert 1e8 < read_bandwidth(threads=1, megabytes=64, seconds=0.1) < 1e12
