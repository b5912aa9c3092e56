"""How policy weights reach the rollout engines: the NCCL path's weight source declares exactly what it
sends and sends what the object-store path does; ppo.weight_sync resolves to what the hardware allows.
(The broadcast itself needs two GPUs: tests/test_ppo.py runs it when they are there.)"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from actors.learner import PolicySource
from actors.rollout import weight_chunks
from clinicalgpt.config import LoraSettings, load_config
from clinicalgpt.modeling import apply_lora, trained_weights


def lora_policy(targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = apply_lora(AutoModelForCausalLM.from_config(config), LoraSettings(targets=list(targets)))
    with torch.no_grad():  # a trained adapter: B starts at zero, which would make every delta vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def test_the_nccl_weight_source_sends_what_it_declares_and_what_the_object_store_path_sends():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine
    model = lora_policy()
    source = PolicySource(model)
    # vLLM's own check on the sender: it raises when iteration disagrees with the declared metadata.
    sent = dict(NCCLTrainerWeightTransferEngine._checked_iter(source, source.metadata()))
    expected = dict(trained_weights(model))
    # q, k, v, o weights and q, k, v biases of both layers, HF names
    assert list(sent) == list(expected) and len(sent) == 2 * 7
    assert all(torch.equal(sent[k], expected[k]) for k in sent)
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(sent["model.layers.0.self_attn.q_proj.weight"], base)  # LoRA merged in
    assert [name for name, _ in source] == list(sent)  # every send iterates it afresh


def test_a_push_carries_whole_fused_layers_when_lora_adapts_part_of_one():
    # vLLM loads q, k and v into one qkv layer (gate and up into one): a reload of q_proj alone left k and v
    # uninitialized (NaN logits). The push carries the adapted modules' siblings, unchanged, with them.
    model = lora_policy(("q_proj", "gate_proj"))
    sent = dict(trained_weights(model))
    layer = model.get_base_model().model.layers[0]
    assert {k for k in sent if k.startswith("model.layers.0.")} == {
        f"model.layers.0.self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias") if (p, t) != ("o", "bias")
    } | {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert torch.equal(sent["model.layers.0.self_attn.k_proj.weight"], layer.self_attn.k_proj.weight)
    assert torch.equal(sent["model.layers.0.self_attn.q_proj.bias"], layer.self_attn.q_proj.base_layer.bias)
    assert not torch.equal(sent["model.layers.0.mlp.gate_proj.weight"], layer.mlp.gate_proj.base_layer.weight)


def test_a_push_enters_the_engine_in_chunks_that_never_split_a_module():
    sent = dict(trained_weights(lora_policy(("q_proj", "gate_proj"))))
    module_bytes = {m: sum(t.numel() * 4 for k, t in sent.items() if k.startswith(m + "."))
                    for m in ("model.layers.0.self_attn", "model.layers.0.mlp")}
    chunks = list(weight_chunks(sent, max_bytes=module_bytes["model.layers.0.self_attn"] + 100))
    assert [list(c) for c in chunks] == [[k for k in sent if k.startswith(m)] for m in (
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp")]
    assert [list(c) for c in weight_chunks(sent, max_bytes=10**9)] == [list(sent)]  # all in one when it fits
    assert module_bytes["model.layers.0.mlp"] > module_bytes["model.layers.0.self_attn"] + 100  # one over the cap


@pytest.mark.parametrize("roles, setting, expected", [
    ([], "auto", "object_store"),  # CPUs
    # The NCCL broadcast has never run: auto keeps the path that has, on GPUs too, until it does.
    (["ppo.rollout.gpus=1", "ppo.learner.gpus=1"], "auto", "object_store"),
    (["ppo.rollout.gpus=1", "ppo.learner.gpus=1"], "nccl", "nccl"),
    (["ppo.rollout.gpus=0.5", "ppo.learner.gpus=0.5"], "auto", "object_store"),  # colocated on one GPU
    (["ppo.rollout.gpus=1", "ppo.learner.gpus=1"], "object_store", "object_store"),
])
def test_weight_sync_resolves_to_what_the_roles_hardware_allows(roles, setting, expected):
    from clinicalgpt.plan import weight_sync_mode
    assert weight_sync_mode(load_config([*roles, f"ppo.weight_sync={setting}"])) == expected


@pytest.mark.parametrize("roles, setting, message", [
    (["ppo.rollout.gpus=0.5", "ppo.learner.gpus=1"], "nccl", "NCCL cannot join two processes on one GPU"),
    ([], "gloo", "one of auto, object_store, nccl"),
])
def test_an_impossible_weight_sync_is_a_clear_error(roles, setting, message):
    from clinicalgpt.plan import weight_sync_mode
    with pytest.raises(SystemExit, match=message):
        weight_sync_mode(load_config([*roles, f"ppo.weight_sync={setting}"]))
