"""Models: build the tiny preset from a config, or load any Hugging Face causal LM."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from .config import ModelConfig

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
