"""Tokenizers: train the tiny preset's own on the corpus, or load a real model's.

The trained tokenizer is byte-level BPE (no unknown characters, Chinese included) with ChatML special
tokens and chat template, saved in Hugging Face format so AutoTokenizer and vLLM load it offline.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# ChatML, the format of Qwen and many Chinese chat models; also the fallback for models without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   chat_template=CHATML_TEMPLATE, model_max_length=1 << 20)


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str, arch: str) -> None:
    """Save a trained tokenizer as a model of architecture `arch` will load it. Beside a config.json,
    transformers rebuilds some tokenizer classes (Qwen2's) from the vocabulary with their own normalizer
    and pre-tokenizer; saved that way, the tokenizer alone (the data job's token counts and packed
    streams, before the model exists) gives the tokens that training, vLLM and serving get."""
    tok.save_pretrained(path)
    AutoTokenizer.from_pretrained(path, config=AutoConfig.for_model(arch)).save_pretrained(path)


def load_tokenizer(path: str, chat_template: str = "") -> PreTrainedTokenizerFast:
    """AutoTokenizer from a folder or hub name; the preset's template fills in a missing one."""
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        tok.chat_template = chat_template or CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a chat rendered with the model's template, up to the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
