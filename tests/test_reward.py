"""The reward model's pieces, checked by hand: the score is read at the last non-pad token (padding
changes nothing), the pairwise loss is -log sigma(r_chosen - r_rejected), constructed pairs carry the
factual error they claim to, and training batches group pairs by length."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from clinicalgpt import reward
from clinicalgpt.config import ModelConfig
from clinicalgpt.modeling import build_config
from clinicalgpt.records import make_record
from clinicalgpt.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["发热咳嗽头痛阿莫西林胶囊布洛芬片呼吸内科"] * 50, vocab_size=300)


def test_score_is_taken_at_the_last_real_token_and_the_loss_is_the_pairwise_log_sigmoid(tokenizer):
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    config = build_config(mc, tokenizer)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config).eval()
    pad = tokenizer.pad_token_id
    chosen, rejected = [5, 9, 12, 7], [5, 9, 30]
    width = 8  # right-padded, as TokenizePairs writes them
    batch = {k: torch.tensor([ids + [pad] * (width - len(ids))]) for k, ids in
             (("chosen_ids", chosen), ("rejected_ids", rejected))}
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in (chosen, rejected)]
        padded = reward.scores(model, torch.cat([batch["chosen_ids"], batch["rejected_ids"]]), pad).tolist()
        loss, metrics, tokens = reward.RewardTask("unused", pad).loss(model, batch)
    assert padded == pytest.approx(alone, abs=1e-5)
    margin = alone[0] - alone[1]
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-margin)), abs=1e-5)
    assert metrics["accuracy"] == (1.0 if margin > 0 else 0.0) and tokens == 7


def kg(subject: str, kind: str, objects: list[str], relation: str = "has") -> dict:
    question, answer = f"{subject}的{kind}？", f"{subject}：{'、'.join(objects)}"
    return make_record(f"kg-{subject}-{kind}", "kg_qa", "kg", "train",
                       [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                       meta={"kind": kind, "relation": relation, "subject": subject, "objects": objects})


def test_constructed_pairs_swap_in_wrong_facts_of_the_same_or_another_kind(monkeypatch):
    monkeypatch.setattr(reward, "KG_PAIR_FRACTION", 1.0)  # every record makes both kinds of pair
    monkeypatch.setattr(reward, "EXAM_PAIR_FRACTION", 1.0)
    records = [kg("感冒", "symptom", ["发热", "咳嗽"]), kg("偏头痛", "symptom", ["头痛"]),
               kg("感冒", "drug", ["布洛芬片"]), kg("肺炎", "symptom", ["咳嗽", "胸痛"]),
               kg("感冒", "cost", ["100元"]),  # an estimate: another disease's cost is not a factual error
               kg("感冒", "good_food", ["鸡蛋"]), kg("胃炎", "good_food", ["苹果"]),  # arbitrary lists: no swaps
               make_record("exam-1", "exam", "exam", "train",
                           [{"role": "user", "content": "发热首选？\nA. 布洛芬\nB. 青霉素"},
                            {"role": "assistant", "content": "答案：A。布洛芬\n解析：退热。"}],
                           meta={"answer": "A", "options": {"A": "布洛芬", "B": "青霉素"}})]
    pairs = reward.constructed_pairs(pa.Table.from_pylist(records), seed=0, kg_en_fraction=0.0, cap=8).to_pylist()
    by_source = {}
    for p in pairs:
        by_source.setdefault(p["source"], []).append(p)
    assert set(by_source) == {"constructed/kg_swap", "constructed/kg_wrong_kind", "constructed/exam_wrong_option"}
    assert not any("100元" in p["chosen"] or "100元" in p["rejected"] for p in pairs)
    assert not [p for p in by_source["constructed/kg_swap"] if "good_food" in p["prompt"]]
    assert [p for p in by_source["constructed/kg_wrong_kind"] if "good_food" in p["prompt"]]

    cold = {p["source"]: p for p in pairs if p["prompt"] == "感冒的symptom？"}
    # Same kind: another disease's symptoms sharing none with the real ones (肺炎 shares 咳嗽, so 偏头痛's).
    assert "头痛" in cold["constructed/kg_swap"]["rejected"] and "发热" not in cold["constructed/kg_swap"]["rejected"]
    # Another kind: a drug listed as a symptom.
    assert "布洛芬片" in cold["constructed/kg_wrong_kind"]["rejected"]

    (exam,) = by_source["constructed/exam_wrong_option"]
    assert exam["chosen"] == "答案：A。布洛芬" and exam["rejected"] == "答案：B。青霉素"
    assert {p["split"] for p in pairs} <= {"train", "test"}


def test_length_groups_make_micro_batches_of_one_length_and_keep_every_pair():
    rng = np.random.default_rng(0)
    lengths = rng.permutation([5] * 16 + [200] * 16)  # KG-sized and preference-sized pairs, mixed
    ids = np.zeros((32, 256), dtype=np.int64)  # pad 0
    for i, n in enumerate(lengths):
        ids[i, :n] = i + 1  # the row's identity
    batch = {"chosen_ids": ids, "rejected_ids": ids.copy(), "source": np.array([str(i) for i in range(32)], dtype=object)}
    grouped = reward.length_groups(batch, micro_batch=8, pad_id=0)
    assert sorted(grouped["chosen_ids"][:, 0]) == list(range(1, 33))  # every pair, once
    assert grouped["source"].tolist() == [str(i - 1) for i in grouped["chosen_ids"][:, 0]]  # columns stay aligned
    widths = (grouped["chosen_ids"] != 0).sum(1).reshape(4, 8)
    assert all(len(set(w)) == 1 for w in widths)  # each micro-batch is of one length: no padding to trim
    assert sorted(widths[:, 0]) == [5, 5, 200, 200]
