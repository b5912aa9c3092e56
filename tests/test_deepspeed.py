"""The training stages' loss by hand, and the DeepSpeed engines as the training stages and the PPO learners build
them, on CPU in this process (gloo, one rank): a LoRA checkpoint leaves the frozen base out and restores what
training changed; gradient checkpointing gives the gradients of the plain backward pass; and the held-out loss the
ranks share (two gloo processes)."""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from clinicalgpt.config import LoraSettings
from clinicalgpt.modeling import apply_lora, enable_gradient_checkpointing
from clinicalgpt.trainer import causal_lm_loss, load_trained_state, save_trained_state, zero2_config
from conftest import free_ports


@pytest.fixture
def deepspeed():
    """A one-rank gloo world for the test, gone after it (the held-out test's forked ranks would inherit it)."""
    import deepspeed
    import torch.distributed as dist
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
    dist.destroy_process_group()


def test_the_causal_lm_loss_predicts_each_labelled_token_from_the_position_before_it():
    """One row of three tokens over a vocabulary of two; labels [-100, 1, 0]: token 1 predicted at position 0 and
    token 0 at position 1, the last position's logits predict nothing. By hand: log-softmax of (0, ln 3) is
    (-ln 4, ln 3 - ln 4), of (ln 2, 0) is (ln 2 - ln 3, -ln 3); the loss is (ln 4 - ln 3 + ln 3 - ln 2) / 2
    = ln 2 / 2."""
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [50.0, -50.0]]], requires_grad=True)

    class Fixed(torch.nn.Module):
        config = SimpleNamespace(model_type="bloom")  # no position_ids

        def forward(self, **kwargs):
            return SimpleNamespace(logits=logits)

    loss, _, tokens = causal_lm_loss(Fixed(), {"input_ids": torch.tensor([[5, 1, 0]]),
                                               "labels": torch.tensor([[-100, 1, 0]])})
    assert loss.item() == pytest.approx(math.log(2) / 2) and tokens == 2
    loss.backward()
    assert logits.grad[0, 2].abs().max() == 0  # the last position's logits take no part


def lora_model(seed: int) -> torch.nn.Module:
    """The same base weights every time; the LoRA adapter's initial weights drawn from `seed`."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(seed)
    return apply_lora(base, LoraSettings(dropout=0.0))


def engine(deepspeed, model: torch.nn.Module):
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                  config=zero2_config(2, 1, 1e-2, 0.0, 1.0, False))
    return ds


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def test_a_lora_checkpoint_leaves_out_the_frozen_base_and_restores_the_trained_state(deepspeed, tmp_path: Path):
    trained = engine(deepspeed, lora_model(seed=1))
    for _ in range(3):
        loss, _, _ = causal_lm_loss(trained, batch())
        trained.backward(loss)
        trained.step()
    save_trained_state(trained, str(tmp_path))
    saved = torch.load(tmp_path / "step" / "mp_rank_00_model_states.pt", weights_only=False)
    trainable = {n for n, p in trained.module.named_parameters() if p.requires_grad}
    assert set(saved["module"]) == trainable and all("lora_" in n for n in trainable)
    assert not saved.get("frozen_param_fragments")  # ZeRO-2 would otherwise store the frozen base a second time

    restored = engine(deepspeed, lora_model(seed=2))  # another adapter, the same base (as a restarted stage)
    load_trained_state(restored, str(tmp_path))
    before, after = trained.module.state_dict(), restored.module.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    # The optimizer state came back too: the next step is the same on both.
    for ds in (trained, restored):
        loss, _, _ = causal_lm_loss(ds, batch())
        ds.backward(loss)
        ds.step()
    for name, p in trained.module.named_parameters():
        torch.testing.assert_close(dict(restored.module.named_parameters())[name], p, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_plain_gradients_of_a_lora_model():
    grads = []
    for checkpointing in (False, True):
        model = lora_model(seed=1)
        with torch.no_grad():  # a trained adapter: B starts at zero, which leaves A without a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        loss, _, _ = causal_lm_loss(model, batch())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and all(g is not None and g.abs().sum() > 0 for g in recomputed.values())
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name])


@pytest.mark.parametrize("cuda, avx512_bf16, amx, expected", [
    (None, True, False, True), (None, False, True, True), (None, False, False, False),  # CPUs: native bf16 or not
    (True, False, False, True), (False, False, False, False),  # GPUs: whether the GPU supports bf16
])
def test_bf16_auto_takes_bf16_only_where_the_hardware_computes_it(monkeypatch, cuda, avx512_bf16, amx, expected):
    from clinicalgpt.runtime import resolve_bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bool(cuda))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_bf16(None) is expected
    assert resolve_bf16(True) is True and resolve_bf16(False) is False  # a setting is kept whatever the hardware


def _held_out_metrics_of_rank(rank: int, world: int, port: int, rows: dict, results) -> None:
    import torch.distributed as dist
    from clinicalgpt.trainer import held_out_metrics
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    task = SimpleNamespace(loss=lambda engine, batch: (batch["x"].double().mean(), {"top": float(batch["x"].max())}, 0),
                           metrics=("top",))
    engine = SimpleNamespace(eval=lambda: None, device=torch.device("cpu"))
    results.put((rank, held_out_metrics(engine, task, rows, 2, rank, world)))
    dist.destroy_process_group()


def test_the_ranks_share_the_held_out_loss_and_each_gets_the_mean_over_every_micro_batch():
    """Nine rows in micro-batches of 2 on two ranks: rank 0 computes batches 0, 2, 4, rank 1 batches 1, 3; both get
    the mean of the five batch means, (0.5 + 2.5 + 4.5 + 6.5 + 8) / 5 = 4.4, as one rank computing all of them; and
    of a metric the task reports beside its loss, the batch maxima: (1 + 3 + 5 + 7 + 8) / 5 = 4.8."""
    # Forked, not spawned: a spawned rank imports clinicalgpt.trainer afresh (~7 s here).
    results = torch.multiprocessing.get_context("fork").SimpleQueue()
    torch.multiprocessing.start_processes(_held_out_metrics_of_rank, nprocs=2, start_method="fork",
                                          args=(2, free_ports(1)[0], {"x": torch.arange(9)}, results))
    expected = {"eval_loss": pytest.approx(4.4), "eval_top": pytest.approx(4.8)}
    assert sorted(results.get() for _ in range(2)) == [(0, expected), (1, expected)]
