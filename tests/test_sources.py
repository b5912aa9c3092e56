"""Builders turn one source line into records or a counted Skip; KG templates are deterministic."""

import json

import pytest

from clinicalgpt.config import DataConfig, SourceSpec, load_config
from clinicalgpt.kg_templates import TEMPLATES, clean_objects, join_objects, render_qa
from clinicalgpt.records import Skip, dedup_key, leak_key, normalize
from clinicalgpt.sources import BUILDERS, builder_for, cut_at_doctor_turn, dialogue_messages

CFG = DataConfig()


def build(kind, obj, split="", **spec):
    return builder_for(SourceSpec(f"test/{kind}", kind, split, **spec))(obj, f"test/{kind}", split, CFG)


def skip_reason(kind, obj, split="", **spec):
    with pytest.raises(Skip) as e:
        build(kind, obj, split, **spec)
    return str(e.value)


# --- KG -> QA ---------------------------------------------------------------------------------

def test_join_objects_natural_and_capped():
    assert join_objects(["咳嗽"], "zh", 8) == "咳嗽"
    assert join_objects(["咳嗽", "发热", "乏力"], "zh", 8) == "咳嗽、发热和乏力"
    assert join_objects(["a", "b", "c", "d"], "zh", 2) == "a和b等"
    assert join_objects(["cough", "fever", "fatigue"], "en", 8) == "cough, fever and fatigue"
    assert join_objects(["a", "b", "c"], "en", 2) == "a, b and others"


def test_clean_objects_drops_truncated_empty_and_repeats():
    assert clean_objects(["枸橼酸西地那非...", "", "他达拉非片", "他达拉非片", " 阿司匹林 "]) == ["他达拉非片", "阿司匹林"]


def test_kg_record_follows_the_template_and_is_deterministic():
    obj = {"s": "百日咳", "p": "has_complication", "o": ["支气管肺炎", "肺不张"]}
    cfg = DataConfig(kg_en_fraction=0.0)
    (rec,) = BUILDERS["kg_xywy"](obj, "kg", "train", cfg)
    question, answer = (m["content"] for m in rec["messages"])
    assert question in [q.format(s="百日咳") for q in TEMPLATES["complication"][0]]
    assert answer == "百日咳可能伴发的疾病和并发症有支气管肺炎和肺不张。"
    assert BUILDERS["kg_xywy"](obj, "kg", "train", cfg) == [rec]  # same seed, same pair


def test_kg_phrasings_and_languages_vary_with_the_seed():
    outs = {render_qa("symptom", f"病{i}", ["发热"], inverse=False, seed=0, en_fraction=0.5, cap=8)[0]
            for i in range(200)}
    zh = [q for q in outs if not q.isascii()]
    assert len({q.replace(q[q.index("病"):q.index("病") + 4], "") for q in zh}) >= 3  # several zh phrasings
    assert any(q.startswith("What") for q in outs)  # and English ones


def test_every_relation_of_both_graphs_has_a_template(data_root):
    for name in ("xywy_kg_triples_grouped", "health39_kg_triples_grouped"):
        relations = {json.loads(line)["p"] for line in open(data_root / "cmedqa_kg" / f"{name}.jsonl")}
        obj = {"s": "病", "o": ["x"]}
        for p in relations:
            assert build("kg_xywy", {**obj, "p": p}), p


def test_kg_bad_input():
    assert skip_reason("kg_xywy", {"p": "has_symptom", "o": ["x"]}) == "missing_field:s"
    assert skip_reason("kg_xywy", {"s": "a", "p": "has_symptom"}) == "missing_field:o"
    assert skip_reason("kg_xywy", {"s": "a", "p": "has_symptom", "o": ["", "x..."]}) == "empty_text"
    assert skip_reason("kg_xywy", {"s": "a", "p": "likes", "o": ["x"]}) == "unknown_relation"


# --- exam -------------------------------------------------------------------------------------

EXAM = {"id": "e1", "question": "上消化道出血的表现取决于", "options": {"A": "原发病", "B": "出血部位", "C": "出血量"},
        "answer": "C", "explanation": "主要取决于出血量。"}


def test_exam_record_has_lettered_options_answer_and_explanation():
    (rec,) = build("exam", EXAM, "train")
    user, reply = (m["content"] for m in rec["messages"])
    assert "A. 原发病\nB. 出血部位\nC. 出血量" in user
    assert reply == "答案：C。出血量\n解析：主要取决于出血量。"
    assert json.loads(rec["meta"])["answer"] == "C"


def test_exam_multi_answer_letters_are_sorted():
    (rec,) = build("exam", {**EXAM, "answer": "CA", "explanation": None}, "train")
    assert rec["messages"][1]["content"] == "答案：AC。原发病；出血量"


def test_exam_bad_input():
    assert skip_reason("exam", {**EXAM, "answer": "F"}) == "answer_not_in_options"
    assert skip_reason("exam", {**EXAM, "answer": ""}) == "empty_text"
    assert skip_reason("exam", {**EXAM, "options": None}) == "missing_field:options"
    assert skip_reason("exam", {**EXAM, "options": {"A": "x", "B": ""}}) == "empty_text"
    assert skip_reason("exam", {k: v for k, v in EXAM.items() if k != "question"}) == "missing_field:question"
    assert skip_reason("exam", {**EXAM, "question": 3}) == "bad_type:question"


# --- dialogue ---------------------------------------------------------------------------------

TURNS = [{"role": "doctor", "text": "你好"}, {"role": "patient", "text": "孩子发烧"},
         {"role": "patient", "text": "三天了"}, {"role": "doctor", "text": "体温多少？"},
         {"role": "patient", "text": "39度"}, {"role": "doctor", "text": "建议就医"}]


def test_dialogue_messages_merge_turns_and_drop_leading_greeting():
    assert dialogue_messages(TURNS) == [
        {"role": "user", "content": "孩子发烧\n三天了"}, {"role": "assistant", "content": "体温多少？"},
        {"role": "user", "content": "39度"}, {"role": "assistant", "content": "建议就医"}]


def test_test_dialogue_is_cut_at_a_seeded_doctor_turn_with_the_real_reply_as_reference():
    (rec,) = build("dialogue", {"id": "d1", "split": "test", "turns": TURNS})
    msgs = dialogue_messages(TURNS)
    assert rec["messages"] == msgs[: len(rec["messages"])] and rec["messages"][-1]["role"] == "assistant"
    cuts = {len(cut_at_doctor_turn(msgs, seed, "d1")) for seed in range(50)}
    assert cuts == {2, 4}  # both doctor turns are possible cut points


def test_train_dialogue_keeps_every_doctor_turn():
    (rec,) = build("dialogue", {"id": "d1", "split": "train", "turns": TURNS})
    assert sum(m["role"] == "assistant" for m in rec["messages"]) == 2


def test_dialogue_bad_input():
    assert skip_reason("dialogue", {"split": "train"}) == "missing_field:turns"
    assert skip_reason("dialogue", {"split": "train", "turns": [{"role": "patient", "text": "hi"}]}) == "no_doctor_reply"
    assert skip_reason("dialogue", {"split": "train", "turns": [{"role": "nurse", "text": "x"}]}) == "bad_turn"
    assert skip_reason("dialogue", {"split": "nope", "turns": TURNS}) == "unknown_split"


# --- diagnosis, QA, preference ------------------------------------------------------------------

def test_dxy_diagnosis_record_concatenates_notes_and_holds_out_a_test_share():
    obj = {"id": "dxy-1", "self_report": "小儿3岁，流清鼻涕", "explicit_symptoms": {"流涕": True},
           "implicit_symptoms": {"打喷嚏": False}, "diagnosis": "过敏性鼻炎", "disease_group": "Respiratory"}
    (rec,) = build("diagnosis_dxy", obj)
    assert "主诉：小儿3岁，流清鼻涕\n症状：流涕（有）、打喷嚏（无）" in rec["messages"][0]["content"]
    assert json.loads(rec["meta"]) == {"diagnosis": "过敏性鼻炎", "disease_group": "Respiratory"}
    splits = [build("diagnosis_dxy", {**obj, "id": f"dxy-{i}"})[0]["split"] for i in range(400)]
    assert 0.12 < splits.count("test") / 400 < 0.28  # holdout_fraction 0.2


def test_cmb_clin_diagnosis_from_title_and_question():
    obj = {"id": "c1", "title": "食管疾病 案例分析-胃食管反流病", "record": "病史…",
           "qa": [{"question": "分析病史", "answer": "…"}, {"question": "诊断是什么？", "answer": "胃食管反流病"}],
           "diagnosis_qa_index": 1}
    (rec,) = build("diagnosis_cmb_clin", obj, "test")
    assert json.loads(rec["meta"]) == {"diagnosis": "胃食管反流病", "disease_group": "食管疾病"}
    assert rec["messages"][0]["content"] == "病史…\n诊断是什么？"
    assert skip_reason("diagnosis_cmb_clin", {**obj, "diagnosis_qa_index": None}) == "no_diagnosis_question"


def test_preference_strips_model_tags_and_rejects_bad_pairs():
    obj = {"prompt": "糖尿病人水泡不愈合", "chosen": "Helper：需要检查感染。", "rejected": "注意卫生。", "source": "pulse"}
    (rec,) = build("preference", obj, "train")
    assert rec["messages"][1]["content"] == "需要检查感染。" and rec["rejected"] == "注意卫生。"
    assert skip_reason("preference", {**obj, "rejected": "Helper：需要检查感染。"}) == "identical_pair"
    assert skip_reason("preference", {**obj, "chosen": "  "}) == "empty_text"
    assert skip_reason("community_qa", {"question": "q"}) == "missing_field:answer"


def test_ranked_responses_make_every_pair_of_a_prompt_weighted_to_count_once():
    def pairs(obj):
        records = build("ranked", {"prompt": "头痛三天怎么办？", **obj}, "train")
        assert len({json.dumps(json.loads(r["meta"]), sort_keys=True) for r in records}) == 1  # one group
        assert json.loads(records[0]["meta"])["group_pairs"] == len(records)
        return [(r["messages"][1]["content"], r["rejected"]) for r in records]
    assert pairs({"responses": ["查头颅CT", "休息观察", "多喝热水"]}) == [  # best first: C(3,2) pairs
        ("查头颅CT", "休息观察"), ("查头颅CT", "多喝热水"), ("休息观察", "多喝热水")]
    assert pairs({"responses": ["多喝热水", "查头颅CT", "休息观察"], "scores": [1, 3, 2.5]}) == [
        ("查头颅CT", "多喝热水"), ("查头颅CT", "休息观察"), ("休息观察", "多喝热水")]
    assert pairs({"responses": ["查头颅CT", "休息观察", "多喝热水"], "scores": [2, 2, 1]}) == [  # a tie: no pair
        ("查头颅CT", "多喝热水"), ("休息观察", "多喝热水")]
    (rec,) = build("ranked", {"question": [{"role": "user", "content": "发热"}], "answers": ["退热", "不管"]},
                   "test", fields={"prompt": "question", "responses": "answers"})
    assert rec["split"] == "test" and rec["messages"][0]["content"] == "发热"
    assert skip_reason("ranked", {"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}) == "no_ranked_pair"
    assert skip_reason("ranked", {"prompt": "q", "responses": ["a", "b"], "scores": [1]}) == "bad_type:scores"
    assert skip_reason("ranked", {"prompt": "q", "responses": ["a"]}) == "bad_type:responses"
    assert skip_reason("ranked", {"prompt": "q", "responses": ["a", " "]}) == "empty_text"
    assert skip_reason("ranked", {"responses": ["a", "b"]}) == "missing_field:prompt"
    assert skip_reason("ranked", {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                             {"role": "user", "content": "q2"}], "responses": ["a", "b"]}) == \
        "multi_turn_prompt"


# --- keys ---------------------------------------------------------------------------------------

def test_keys_ignore_punctuation_case_and_width():
    a = {"messages": [{"role": "user", "content": "高血压能吃党参吗？"}, {"role": "assistant", "content": "可以。"}]}
    b = {"messages": [{"role": "user", "content": "高血压 能吃党参吗?"}, {"role": "assistant", "content": "可以"}]}
    assert normalize("ＡＢc，d") == "abcd"
    assert dedup_key(a) == dedup_key(b) and leak_key(a) == leak_key(b)


def test_leak_key_reads_past_a_short_first_message():
    short = [{"role": "user", "content": "嗯"}, {"role": "assistant", "content": "?"}]
    a = {"messages": short + [{"role": "user", "content": "孩子拉肚子两天了怎么办呢医生"}]}
    b = {"messages": short + [{"role": "user", "content": "宝宝咳嗽一周了要不要去医院看看"}]}
    assert leak_key(a) != leak_key(b)


# --- config -------------------------------------------------------------------------------------

def test_presets_and_overrides():
    assert load_config([]).preset == "tiny"
    bloom = load_config(["preset=bloom-7b", "seq.max_len=2048"])
    assert bloom.model.path == "bigscience/bloom-7b1" and bloom.seq.max_len == 2048 and not bloom.seq.pack
    assert load_config(["preset=qwen2.5-7b"]).model.path.startswith("Qwen/")
    with pytest.raises(SystemExit, match="nope"):
        load_config(["seq.nope=1"])
    with pytest.raises(SystemExit, match="unknown preset"):
        load_config(["preset=gpt-9"])


def test_data_root_from_env_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("CLINICALGPT_DATA_ROOT", str(tmp_path))
    assert load_config([]).data_root == tmp_path
    assert load_config([f"data.root={tmp_path / 'x'}"]).data_root == tmp_path / "x"


@pytest.mark.parametrize("preset, arch", [("bloom-7b", "bloom"), ("qwen2.5-7b", "qwen2")])
def test_each_presets_lora_targets_exist_in_its_architecture(preset, arch):
    """LoRA on the attention projections, under the names the model family uses (BLOOM fuses q, k, v)."""
    from clinicalgpt.config import ModelConfig
    from clinicalgpt.modeling import build_model
    from clinicalgpt.tokenizer import train_tokenizer
    from clinicalgpt.modeling import apply_lora
    cfg = load_config([f"preset={preset}"])
    tok = train_tokenizer(["高血压患者可以吃党参吗？"] * 10, vocab_size=300)
    for lora in (cfg.sft.lora, cfg.ppo.lora):
        model = apply_lora(build_model(ModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                                   intermediate_size=128), tok), lora)
        adapted = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
        assert adapted == set(lora.targets), adapted


@pytest.mark.parametrize("arch, dtype, packs, adapted", [
    ("bloom", "bfloat16", False, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("llama", "float16", True, {f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")})])
def test_a_models_own_folder_gives_the_hf_preset_its_dtype_packing_and_lora_layers(tmp_path, arch, dtype, packs,
                                                                                   adapted):
    """preset=hf model.path=<a Hugging Face causal LM>: the model's dtype, packing only where its forward takes
    per-sample positions (BLOOM's ALiBi: no), LoRA on all its linear layers but the output head."""
    import torch

    from clinicalgpt.config import ModelConfig
    from clinicalgpt.modeling import apply_lora, build_model
    from clinicalgpt.tokenizer import train_tokenizer
    tok = train_tokenizer(["高血压患者可以吃党参吗？"] * 10, vocab_size=300)
    model = build_model(ModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=128), tok).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    cfg = load_config(["preset=hf", f"model.path={tmp_path / arch}"])
    assert (cfg.model.dtype, cfg.seq.pack) == (dtype, packs)
    assert load_config(["preset=hf", f"model.path={tmp_path / arch}", "seq.pack=true"]).seq.pack  # a stated value stays
    lora_model = apply_lora(build_model(ModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4,
                                                    num_kv_heads=2, intermediate_size=128), tok), cfg.sft.lora)
    assert {name.split(".")[-4] for name, _ in lora_model.named_parameters() if "lora_A" in name} == adapted
    with pytest.raises(SystemExit, match="no model config"):
        load_config(["preset=hf", f"model.path={tmp_path / 'absent'}"])


# --- the ecosystem's formats (a user's own chats) ----------------------------------------------------

def build_format(kind, obj, task="dialogue", split="train", fields=None):
    from clinicalgpt.config import SourceSpec
    from clinicalgpt.sources import builder_for
    build = builder_for(SourceSpec(f"mine/{kind}.jsonl", kind, split, task, fields or {}))
    return build(obj, f"mine/{kind}", split, CFG)


CHAT = [{"role": "system", "content": "你是一名全科医生。"}, {"role": "user", "content": "头痛三天，伴有发热。"},
        {"role": "assistant", "content": "有没有咳嗽？"}, {"role": "user", "content": "有一点。"},
        {"role": "assistant", "content": "可能是上呼吸道感染，建议查血常规。"}, {"role": "user", "content": "谢谢"}]


def test_openai_chats_and_sharegpt_conversations_become_the_same_dialogue():
    (rec,) = build_format("chat", {"messages": CHAT})
    # Every turn kept (the trailing user turn has no reply to learn from); SFT trains on every assistant turn.
    assert rec["task"] == "dialogue" and rec["split"] == "train" and rec["messages"] == CHAT[:5]
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]}
    (same,) = build_format("sharegpt", sharegpt)
    assert {k: v for k, v in same.items() if k not in ("id", "source")} == {
        k: v for k, v in rec.items() if k not in ("id", "source")}
    # Consecutive turns of one speaker merged, empty ones dropped, text stripped.
    split_turns = [CHAT[1], {"role": "user", "content": " 体温38度 "}, {"role": "assistant", "content": ""}, CHAT[2]]
    (merged,) = build_format("chat", {"messages": split_turns}, task="community_qa")
    assert merged["task"] == "community_qa"
    assert merged["messages"] == [{"role": "user", "content": "头痛三天，伴有发热。\n体温38度"}, CHAT[2]]


def test_a_test_split_dialogue_is_cut_at_a_doctor_turn_for_the_evaluation():
    (rec,) = build_format("chat", {"messages": CHAT, "id": "d1"}, split="test")
    assert rec["split"] == "test" and rec["messages"][-1]["role"] == "assistant"
    assert rec["messages"] == CHAT[:json.loads(rec["meta"])["cut_turn"] + 1]


def test_alpaca_records_and_field_names_mapped_to_the_files():
    (rec,) = build_format("alpaca", {"instruction": "解释下列检查结果", "input": "白细胞 12.5", "output": "提示感染。"},
                          task="community_qa")
    assert rec["messages"] == [{"role": "user", "content": "解释下列检查结果\n白细胞 12.5"},
                               {"role": "assistant", "content": "提示感染。"}]
    renamed = {"问题": "解释下列检查结果", "补充": "白细胞 12.5", "回答": "提示感染。"}
    fields = {"instruction": "问题", "input": "补充", "output": "回答"}
    assert build_format("alpaca", renamed, task="community_qa", fields=fields)[0]["messages"] == rec["messages"]
    assert build_format("chat", {"对话": CHAT[1:3]}, fields={"messages": "对话"})[0]["messages"] == CHAT[1:3]


def test_a_format_record_that_does_not_fit_is_a_counted_skip():
    def reason(kind, obj, **kw):
        with pytest.raises(Skip) as e:
            build_format(kind, obj, **kw)
        return str(e.value)
    assert reason("chat", {"text": "hi"}) == "missing_field:messages"
    assert reason("chat", {"messages": [{"role": "doctor", "content": "x"}]}) == "bad_turn"
    assert reason("chat", {"messages": [CHAT[1], {"role": "assistant", "content": 3}]}) == "bad_type:content"
    assert reason("chat", {"messages": [CHAT[1]]}) == "no_assistant_reply"
    assert reason("chat", {"messages": [CHAT[0], CHAT[2]]}) == "no_user_turn"
    assert reason("chat", {"messages": [CHAT[1], CHAT[0], CHAT[2]]}) == "bad_turn"  # a system turn only first
    assert reason("alpaca", {"instruction": "x"}, task="community_qa") == "missing_field:output"
    assert reason("chat", {"messages": CHAT, "split": "holdout"}, split="") == "unknown_split"


def test_without_a_split_a_seeded_share_is_held_out_for_evaluation():
    def splits():
        return [build_format("alpaca", {"instruction": f"问题{i}", "output": "回答"}, task="community_qa",
                             split="")[0]["split"] for i in range(400)]
    first = splits()
    assert set(first) == {"train", "test"} and 0.15 < first.count("test") / 400 < 0.25  # data.holdout_fraction 0.2
    assert splits() == first  # seeded: the same records, the same split


def test_a_format_without_a_task_or_an_unknown_kind_is_refused():
    from clinicalgpt.config import SourceSpec
    from clinicalgpt.sources import builder_for
    with pytest.raises(ValueError, match="kind chat needs a task, one of dialogue, community_qa"):
        builder_for(SourceSpec("mine/chats.jsonl", "chat"))
    with pytest.raises(ValueError, match="unknown kind 'csv'.*formats: chat, sharegpt, alpaca"):
        builder_for(SourceSpec("mine/chats.jsonl", "csv"))
