"""The reward model's pieces, checked by hand: the score is read at the last non-pad token (padding
changes nothing), the pairwise loss is -log sigma(r_chosen - r_rejected), constructed pairs carry the
factual error they claim to, and training batches group pairs by length."""

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from clinicalgpt import reward_model
from clinicalgpt.config import ModelConfig, load_config
from clinicalgpt.modeling import build_config
from clinicalgpt.packing import keep_sampled
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
    width = 8  # right-padded, as reward_model.padded makes them
    batch = {k: torch.tensor([ids + [pad] * (width - len(ids))]) for k, ids in
             (("chosen_ids", chosen), ("rejected_ids", rejected))}
    batch["weight"] = torch.tensor([1.0])
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in (chosen, rejected)]
        padded = reward_model.scores(model, torch.cat([batch["chosen_ids"], batch["rejected_ids"]]), pad).tolist()
        loss, metrics, tokens = reward_model.RewardTask("unused", pad).loss(model, batch)
    assert padded == pytest.approx(alone, abs=1e-5)
    margin = alone[0] - alone[1]
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-margin)), abs=1e-5)
    assert metrics["accuracy"] == (1.0 if margin > 0 else 0.0) and tokens == 7


def test_the_base_models_preference_is_its_mean_log_prob_per_reply_token(tokenizer):
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(mc, tokenizer)).eval()
    pad = tokenizer.pad_token_id
    # (prompt, reply), right-padded as reward_model.padded makes them; the first row is the shorter one
    rows = [([5, 9], [12, 7, 3]), ([5, 9, 14, 2], [30, 8])]
    ids = np.array([p + r + [pad] * (8 - len(p) - len(r)) for p, r in rows])
    with torch.no_grad():
        got = reward_model.reply_likelihood(model, ids, np.array([len(r) for _, r in rows]), pad)
        for (prompt, reply), value in zip(rows, got):
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + reply])).logits[0], -1)
            by_hand = np.mean([logp[len(prompt) + j - 1, t].item() for j, t in enumerate(reply)])
            assert value == pytest.approx(by_hand, abs=1e-5)


def kg(subject: str, kind: str, objects: list[str], relation: str = "has") -> dict:
    question, answer = f"{subject}的{kind}？", f"{subject}：{'、'.join(objects)}"
    return make_record(f"kg-{subject}-{kind}", "kg_qa", "kg", "train",
                       [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                       meta={"kind": kind, "relation": relation, "subject": subject, "objects": objects})


def test_kg_pairs_swap_in_wrong_facts_from_another_department_or_of_another_kind(monkeypatch):
    monkeypatch.setattr(reward_model, "KG_PAIR_FRACTION", 1.0)  # every record makes both kinds of pair
    departments = {"感冒": ["内科", "呼吸内科"], "肺炎": ["内科", "呼吸内科"], "哮喘": ["内科"],
                   "偏头痛": ["神经科"], "骨折": ["外科", "骨科"], "湿疹": ["皮肤科"]}
    records = [kg("感冒", "symptom", ["发热", "咳嗽"]),
               kg("哮喘", "symptom", ["喘息"]),  # shares no symptom, but the department: not surely wrong
               kg("肺炎", "symptom", ["咳嗽", "胸痛"]),  # shares 咳嗽
               kg("偏头痛", "symptom", ["头痛"]),  # another department: the same-kind swap for 感冒
               kg("感冒", "drug", ["布洛芬片"]),
               kg("不明病", "drug", ["某药"]),  # no known department: no same-kind swap either way
               kg("感冒", "cost", ["100元"]),  # an estimate: another disease's cost is not a factual error
               kg("骨折", "treatment", ["手术治疗"]), kg("湿疹", "treatment", ["药物治疗"]),  # shared few values
               kg("感冒", "good_food", ["鸡蛋"]), kg("湿疹", "good_food", ["苹果"])]  # arbitrary lists
    pairs = reward_model.kg_pairs(pa.Table.from_pylist(records), seed=0, kg_en_fraction=0.0, cap=8,
                            departments=departments).to_pylist()
    swaps = {p["prompt"]: p for p in pairs if p["source"] == "constructed/kg_swap"}
    wrong_kind = {p["prompt"]: p for p in pairs if p["source"] == "constructed/kg_wrong_kind"}
    assert not any("100元" in p["chosen"] or "100元" in p["rejected"] for p in pairs)
    # Same kind: another department's symptoms, sharing none with the real ones (so 偏头痛's, not 哮喘's).
    assert "头痛" in swaps["感冒的symptom？"]["rejected"] and "喘息" not in swaps["感冒的symptom？"]["rejected"]
    assert "不明病的drug？" not in swaps and "感冒的drug？" not in swaps  # 不明病: no department to differ from
    assert not [p for p in swaps if "good_food" in p or "treatment" in p]
    # Another kind: any record of another kind sharing no object, e.g. foods or drugs listed as symptoms.
    assert {"感冒的symptom？", "湿疹的good_food？", "骨折的treatment？"} <= set(wrong_kind)
    assert "布洛芬片" in wrong_kind["感冒的symptom？"]["rejected"]  # the next record of another kind: a drug
    assert {p["split"] for p in pairs} <= {"train", "test"}


def test_disease_departments_come_from_the_department_records(ray_session):
    records = [kg("感冒", "department", ["内科", "呼吸内科"]), kg("感冒", "symptom", ["发热"]),
               kg("骨折", "department", ["骨科"])]
    assert reward_model.disease_departments(ray.data.from_items(records)) == {"感冒": ["内科", "呼吸内科"], "骨折": ["骨科"]}


def test_exam_pairs_name_a_wrong_option(monkeypatch):
    monkeypatch.setattr(reward_model, "EXAM_PAIR_FRACTION", 1.0)
    record = make_record("exam-1", "exam", "exam", "train",
                         [{"role": "user", "content": "发热首选？\nA. 布洛芬\nB. 青霉素"},
                          {"role": "assistant", "content": "答案：A。布洛芬\n解析：退热。"}],
                         meta={"answer": "A", "options": {"A": "布洛芬", "B": "青霉素"}})
    (pair,) = reward_model.exam_pairs(pa.Table.from_pylist([record]), seed=0).to_pylist()
    assert pair["chosen"] == "答案：A。布洛芬" and pair["rejected"] == "答案：B。青霉素"
    assert pair["source"] == "constructed/exam_wrong_option"


def test_a_sources_training_share_keeps_that_share_of_its_pairs_by_a_stable_hash():
    pairs = pa.Table.from_pylist([{"source": s, "prompt": f"问题{i}", "rejected": f"错误回答{i}"}
                                  for i in range(2000) for s in ("a", "b")])

    def share(seed):  # as jobs/rm.py samples its training pairs
        return keep_sampled(pairs, {"a": 0.2}, seed, group="source", keys=("prompt", "rejected"),
                            salt="rm-share").to_pylist()

    kept = share(0)
    counts = Counter(p["source"] for p in kept)
    assert counts["b"] == 2000  # a source without a share keeps all its pairs
    assert 340 < counts["a"] < 460  # 0.2 x 2000 = 400, binomial sd 18
    assert kept == share(0)  # the same pairs each run
    assert kept != share(1)
    # The tiny preset trains on a share of the pairs it cannot learn; presets of real models on all of them
    # (preset YAML merges into the dataclass defaults, so they must restate the sources).
    assert load_config([]).rm.pair_fractions == {"constructed/kg_swap": 0.2, "constructed/exam_wrong_option": 0.2}
    for preset in ("bloom-7b", "qwen2.5-7b"):
        assert set(load_config([f"preset={preset}"]).rm.pair_fractions.values()) == {1.0}


def test_the_judge_trains_on_the_other_half_of_the_pairs_with_the_next_seed():
    pairs = pa.Table.from_pylist([{"prompt": f"问题{i}", "chosen": f"回答{i}", "rejected": f"错误回答{i}", "group": ""}
                                  for i in range(2000)])
    first, second = (reward_model.in_half(pairs, h).to_pylist() for h in (1, 2))
    assert 900 < len(first) < 1100 and len(first) + len(second) == 2000  # binomial sd 22
    assert not {p["prompt"] for p in first} & {p["prompt"] for p in second}  # disjoint: every pair in one half
    assert reward_model.in_half(pairs, 1).to_pylist() == first  # the same halves each run, whatever the seed
    # A ranked set's pairs (one group) go to one half together.
    ranked = pa.Table.from_pylist([{"prompt": f"问题{i // 6}", "chosen": f"回答{i}", "rejected": f"错误回答{i}",
                                    "group": f"set{i // 6}"} for i in range(600)])
    halves = [{p["group"] for p in reward_model.in_half(ranked, h).to_pylist()} for h in (1, 2)]
    assert not halves[0] & halves[1] and len(halves[0]) + len(halves[1]) == 100

    cfg = load_config([])
    rm, judge = reward_model.stage_config(cfg, "rm"), reward_model.stage_config(cfg, "judge")
    assert (rm.pair_half, rm.seed) == (1, 0) and (judge.pair_half, judge.seed) == (2, 1)
    assert (judge.lr, judge.max_steps, judge.pair_fractions) == (rm.lr, rm.max_steps, rm.pair_fractions)
    with pytest.raises(SystemExit, match="rm.pair_half to 1 or 2"):
        reward_model.stage_config(load_config(["rm.pair_half=0"]), "judge")


def test_pairs_are_tokenized_unpadded_with_whole_replies_and_the_prompt_cut_from_the_left(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    tokenize = reward_model.TokenizePairs(str(tmp_path), "", max_len=48)
    pairs = pa.table({"prompt": ["发热咳嗽", "头痛" * 40], "chosen": ["布洛芬片", "阿莫西林"], "rejected": ["呼吸内科", "某"],
                      "source": ["a", "b"], "split": ["train", "test"]})
    out = tokenize(pairs)
    assert out.column_names[:5] == pairs.column_names  # the pair, then its tokens
    for i, row in enumerate(pairs.to_pylist()):
        head = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        head = tokenizer(head, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            reply_ids = tokenizer(row[side] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            assert out.column(f"{side}_reply_len")[i].as_py() == len(reply_ids)
            # The short pair whole; of the long one, the reply and the end of the prompt.
            assert out.column(f"{side}_ids")[i].as_py() == (head + reply_ids)[-48:]
    assert len(out.column("chosen_ids")[1].as_py()) == 48 and len(out.column("chosen_ids")[0].as_py()) < 48


def test_length_groups_pad_and_make_micro_batches_of_one_length_and_keep_every_pair():
    rng = np.random.default_rng(0)
    lengths = rng.permutation([5] * 16 + [200] * 16)  # KG-sized and preference-sized pairs, mixed
    ids = [[i + 1] * n for i, n in enumerate(lengths)]  # the row's identity, unpadded as TokenizePairs writes them
    batch = pa.table({"chosen_ids": ids, "rejected_ids": ids, "chosen_reply_len": [2] * 32, "rejected_reply_len": [3] * 32,
                      "weight": pa.array([1.0] * 32, pa.float32()), "source": [str(i) for i in range(32)]})
    grouped = reward_model.length_groups(batch, micro_batch=8, pad_id=0, max_len=256)
    assert grouped["chosen_ids"].shape == (32, 256) and grouped["chosen_ids"].dtype == np.int64  # right-padded
    assert sorted(grouped["chosen_ids"][:, 0]) == list(range(1, 33))  # every pair, once
    assert grouped["source"].tolist() == [str(i - 1) for i in grouped["chosen_ids"][:, 0]]  # columns stay aligned
    assert (grouped["chosen_reply_len"] == 2).all() and (grouped["rejected_reply_len"] == 3).all()
    widths = (grouped["chosen_ids"] != 0).sum(1).reshape(4, 8)
    assert all(len(set(w)) == 1 for w in widths)  # each micro-batch is of one length: no padding to trim
    assert sorted(widths[:, 0]) == [5, 5, 200, 200]


def test_length_bias_is_the_score_length_correlation_and_how_often_the_longer_reply_scores_higher():
    # (score, reply tokens): pair 1 the longer reply (chosen) scores higher, pair 2 the longer (rejected) scores
    # lower, pair 3 equal lengths (left out of the share): prefers_longer 1/2.
    chosen = np.array([[2.0, 10], [1.0, 4], [0.0, 6]])
    rejected = np.array([[1.0, 5], [0.5, 8], [0.5, 6]])
    bias = reward_model.length_bias(chosen, rejected)
    assert bias["prefers_longer"] == 0.5
    # scores 2 1 0 1 0.5 0.5 (mean 5/6), lengths 10 4 6 5 8 6 (mean 6.5): sum dx dy = 7/6*3.5 + 1/6*-2.5
    # + -5/6*-0.5 + 1/6*-1.5 + -1/3*1.5 + -1/3*-0.5 = 3.5; sum dx^2 = 7/3, sum dy^2 = 23.5.
    assert bias["score_length_correlation"] == pytest.approx(3.5 / (7 / 3 * 23.5) ** 0.5)
    assert reward_model.length_bias(chosen[2:], rejected[2:])["prefers_longer"] == 0.5  # no unequal pair


def test_pairwise_accuracy_counts_wins_per_source_with_ties_half_for_the_baselines():
    # Three pairs, columns (chosen, rejected): a wins by score, longer row and likelihood; b loses by score and
    # ties on row length and likelihood; c wins by score, loses by length and likelihood.
    scored = {"score": np.array([[2.0, 1.0], [0.0, 0.5], [1.0, 0.0]]),
              "liked": np.array([[-1.0, -2.0], [-1.0, -1.0], [-3.0, -2.0]]),
              "row_len": np.array([[9, 7], [5, 5], [4, 8]]), "reply_len": np.array([[5, 3], [2, 2], [1, 5]])}
    accuracy = reward_model.pairwise_accuracy(scored, np.array(["a", "b", "a"]))
    assert accuracy["pairs"] == 3 and accuracy["overall"] == pytest.approx(2 / 3)
    assert accuracy["length_baseline"] == pytest.approx(1.5 / 3) and accuracy["base_likelihood"] == pytest.approx(1.5 / 3)
    assert accuracy["per_source"]["a"] == {"accuracy": 1.0, "length_baseline": 0.5, "base_likelihood": 0.5, "pairs": 2}
    assert accuracy["per_source"]["b"] == {"accuracy": 0.0, "length_baseline": 0.5, "base_likelihood": 0.5, "pairs": 1}
    # Length bias over (score, reply length): the longer reply scores higher in a (5 > 3), lower in c (1 < 5).
    assert accuracy["prefers_longer"] == 0.5


def test_the_pair_loss_weights_a_ranked_set_to_count_as_one_pair():
    """-sum(w log sigmoid(r_chosen - r_rejected)) / sum(w); a toy head scores a sequence by its first token id."""
    from types import SimpleNamespace

    class FirstToken(torch.nn.Module):
        def forward(self, input_ids, use_cache):
            return SimpleNamespace(logits=input_ids[:, :1].float())

    batch = {"chosen_ids": torch.tensor([[3, 1], [2, 1], [4, 1]]), "rejected_ids": torch.tensor([[1, 1], [2, 1], [1, 1]]),
             "weight": torch.tensor([0.5, 0.5, 1.0])}  # margins 2, 0, 3: a ranked set's two pairs, then a lone pair
    loss, metrics, tokens = reward_model.RewardTask("unused", pad_id=0).loss(FirstToken(), batch)
    # (0.5 x 0.126928 + 0.5 x 0.693147 + 1 x 0.048587) / 2, with -log sigmoid(2), (0), (3) by hand
    assert loss.item() == pytest.approx(0.229312, abs=1e-6)
    assert metrics == {"accuracy": pytest.approx(2 / 3)} and tokens == 12
