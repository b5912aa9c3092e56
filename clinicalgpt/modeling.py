"""Models: build the tiny preset from a config, load any Hugging Face causal LM, and the weights a PPO weight
push carries from the LoRA-trained policy to the rollout engines."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from .config import LoraSettings, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_config(mc: ModelConfig, tokenizer) -> AutoConfig:
    """A small decoder of the preset's architecture sized by the preset.

    Qwen2 by default: vLLM's CPU engine runs it, and its rotary positions take per-sample position_ids,
    which is what makes packed sequences exact (BLOOM's ALiBi is built from a 2D padding mask)."""
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id}
    if mc.arch == "qwen2":
        return AutoConfig.for_model(
            "qwen2", hidden_size=mc.hidden_size, num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
            intermediate_size=mc.intermediate_size, max_position_embeddings=mc.max_position_embeddings,
            tie_word_embeddings=True, rope_theta=10000.0, **ids)
    if mc.arch == "llama":
        return AutoConfig.for_model(
            "llama", hidden_size=mc.hidden_size, num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
            intermediate_size=mc.intermediate_size, max_position_embeddings=mc.max_position_embeddings,
            tie_word_embeddings=True, **ids)
    if mc.arch == "bloom":
        return AutoConfig.for_model("bloom", hidden_size=mc.hidden_size, n_layer=mc.num_layers,
                                    n_head=mc.num_heads, **ids)
    raise ValueError(f"unknown model.arch {mc.arch!r} (qwen2, llama, bloom)")


def build_model(mc: ModelConfig, tokenizer, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(mc, tokenizer), dtype=DTYPES[mc.dtype])
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def load_model(path: str, dtype: str = "float32") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pushed_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, object]]:
    """(Hugging Face name, current tensor, the LoRA layer whose delta it takes or None) of each tensor a weight
    push carries. Without LoRA, the whole state dict. With LoRA, every parameter of each module that holds an
    adapted layer (self_attn, mlp): vLLM fuses q, k and v (gate and up) into one layer, and an in-place reload
    that sets only part of one leaves the rest uninitialized (NaN logits seen with LoRA on q_proj alone)."""
    if not hasattr(model, "get_base_model"):
        for name, weight in model.state_dict().items():
            yield name, weight, None
        return
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model()
    parents = dict.fromkeys(name.rpartition(".")[0] for name, m in base.named_modules() if isinstance(m, LoraLayer))
    for parent in parents:
        for child_name, child in base.get_submodule(parent).named_children():
            lora = child if isinstance(child, LoraLayer) else None
            for name, tensor in (lora.get_base_layer() if lora else child).named_parameters():
                yield f"{parent}.{child_name}.{name}", tensor, lora if lora and name == "weight" else None


def trained_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights a push carries (pushed_tensors), under Hugging Face names, one at a time (merging a 7B model's
    adapted layers all at once would take GBs of GPU memory beside training): an adapted layer's weight with its
    LoRA delta added (computed without touching the model: merging and unmerging in place would drift in bf16);
    the rest as they are, the engines holding the frozen others since they started."""
    with torch.no_grad():
        for name, weight, lora in pushed_tensors(model):
            if lora is None:
                yield name, weight.detach()
            else:
                yield name, weight.detach() + sum(lora.get_delta_weight(a).to(weight.dtype) for a in lora.active_adapters)


def apply_lora(model: torch.nn.Module, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model
    targets = "all-linear" if list(lora.targets) == ["all-linear"] else list(lora.targets)  # peft's: every linear layer
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets, task_type=task_type))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each layer's input and recompute the rest in the backward pass (docs/sizing.md). transformers
    also makes the embeddings' output require grad (enable_input_require_grads), without which a LoRA model's
    frozen embeddings would cut the gradient off from the checkpointed layers. The KV cache is off already:
    every training forward passes use_cache=False (setting it in the config would be exported with the model)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def zero_dropout(model: torch.nn.Module) -> None:
    """Every dropout module's p at 0, so that the model has no dropout in train mode either (dropout applied
    functionally follows the model's config: 0 in the presets' models)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def without_dropout(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """Dropout off, as PPO needs (its ratio must be exactly 1 before the first update). transformers recomputes
    activations only in train mode, so under gradient checkpointing the model stays in train mode, dropout zeroed."""
    if not gradient_checkpointing:
        model.eval()
        return
    model.train()
    zero_dropout(model)
