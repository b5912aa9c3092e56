"""Response-only labels from the chat template, first-fit packing, and packing exactness: the loss of a
packed batch equals the loss of the same samples run one by one."""

import json

import pytest
import torch

from clinicalgpt.config import ModelConfig
from clinicalgpt.modeling import build_model
from clinicalgpt.packing import IGNORE, pack, tokenize_chats
from clinicalgpt.tokenizer import IM_END, load_tokenizer, save_tokenizer, train_tokenizer

CHAT = [{"role": "user", "content": "孩子发烧三天了"}, {"role": "assistant", "content": "体温多少？"},
        {"role": "user", "content": "39度"}, {"role": "assistant", "content": "建议尽快就医。"}]


@pytest.fixture(scope="module")
def tokenizer(data_root):
    texts = []
    with open(data_root / "community_qa" / "toyhom_internal_medicine_train.jsonl") as f:
        for _, raw in zip(range(400), f):
            obj = json.loads(raw)
            texts.append(obj["question"] + obj["answer"])
    return train_tokenizer(texts, vocab_size=1200)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "bloom"])
def test_a_trained_tokenizer_gives_the_same_tokens_before_and_after_its_model_exists(tmp_path, arch):
    """The data job tokenizes with the tokenizer alone; the stages after it load it beside the model's
    config.json, which makes transformers rebuild Qwen2's tokenizer with its own pre-tokenizer."""
    from transformers import AutoConfig
    texts = ["患者男，45岁，头痛3天，血压160/95 mmHg。", "Take 2 tablets twice a day; call 120 if it's worse.",
             "孩子发烧39度，咳嗽两天了，需要去医院吗？"]
    save_tokenizer(train_tokenizer(texts * 20, vocab_size=400), str(tmp_path), arch)
    alone = load_tokenizer(str(tmp_path))
    AutoConfig.for_model(arch).save_pretrained(tmp_path)  # what the bootstrap adds
    beside_the_model = load_tokenizer(str(tmp_path))
    assert [alone(t)["input_ids"] for t in texts] == [beside_the_model(t)["input_ids"] for t in texts]
    assert alone.apply_chat_template(CHAT, tokenize=False) == beside_the_model.apply_chat_template(CHAT, tokenize=False)


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    ((ids, labels),) = tokenize_chats(tokenizer, [CHAT])
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert all(labels[t] == ids[t] for t in range(len(ids)) if labels[t] != IGNORE)
    # Both doctor turns (with their end-of-turn token) are trained, nothing of the patient's.
    assert tokenizer.decode(trained) == f"体温多少？{IM_END}\n建议尽快就医。{IM_END}\n"
    assert "发烧" not in tokenizer.decode(trained) and "39" not in tokenizer.decode(trained)


def test_pack_rows_are_full_length_with_restarting_positions(tokenizer):
    samples = tokenize_chats(tokenizer, [CHAT[:2], CHAT, CHAT[2:], CHAT[:2]] * 5)
    max_len = 160
    out = pack(samples, max_len, tokenizer.pad_token_id)
    assert out["input_ids"].shape[1] == max_len and out["num_samples"].sum() == len(samples)
    assert out["num_tokens"].sum() == sum(len(s[0]) for s in samples)
    # Every sample appears intact (ids and labels), positions 0..n-1, none split across rows.
    found = []
    for r in range(len(out["input_ids"])):
        starts = list((out["position_ids"][r] == 0).nonzero()[0]) + [max_len]
        for a, b in zip(starts, starts[1:]):
            assert list(out["position_ids"][r, a:b]) == list(range(b - a))
            found.append((list(out["input_ids"][r, a:b]), list(out["labels"][r, a:b])))
    for s in samples:
        assert (list(s[0]), list(s[1])) in found
    assert len(out["input_ids"]) <= len(samples) // 2  # several samples share a row


def test_unpacked_mode_puts_one_sample_per_row(tokenizer):
    samples = tokenize_chats(tokenizer, [CHAT[:2], CHAT])
    out = pack(samples, 64, tokenizer.pad_token_id, together=False)
    assert list(out["num_samples"]) == [1, 1]


def test_packed_loss_equals_unpacked_loss(tokenizer):
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=128), tokenizer).eval()
    samples = tokenize_chats(tokenizer, [CHAT, CHAT[:2], CHAT[2:], [CHAT[2], CHAT[1]]])
    packed = pack(samples, 96, tokenizer.pad_token_id)
    assert packed["num_samples"].max() >= 2  # the comparison is about samples sharing a row

    def token_losses(ids, labels, positions):
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                                 reduction="sum"), (labels[:, 1:] != IGNORE).sum()

    with torch.no_grad():
        packed_sum, packed_n = token_losses(*(torch.tensor(packed[k]) for k in ("input_ids", "labels", "position_ids")))
        sums, ns = zip(*(token_losses(torch.tensor([ids]), torch.tensor([labels]), torch.arange(len(ids))[None])
                         for ids, labels in samples))
        # Same-row samples attending to each other would change the packed loss.
        assert packed_n == sum(ns)
        assert torch.allclose(packed_sum / packed_n, sum(sums) / sum(ns), atol=1e-5)
        # Sanity: without restarting positions the packed rows give a different loss.
        flat = torch.arange(packed["input_ids"].shape[1]).expand(packed["input_ids"].shape[0], -1)
        wrong, _ = token_losses(torch.tensor(packed["input_ids"]), torch.tensor(packed["labels"]), flat)
        assert not torch.allclose(wrong / packed_n, packed_sum / packed_n, atol=1e-4)
