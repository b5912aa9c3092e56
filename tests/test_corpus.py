"""The Ray Data corpus pipeline on small crafted sources: every kind of bad input is skipped, counted
by reason and kept in skipped.jsonl; test questions never reach training; a missing file is a clear error."""

import json

import pyarrow.parquet as pq
import pytest

from clinicalgpt.config import SourceSpec, load_config
from clinicalgpt.corpus import SourceError, build_records

GOOD = {"question": "上消化道出血的表现取决于", "options": {"A": "原发病", "B": "出血部位", "C": "出血量"}, "answer": "C"}


def line(obj):
    return json.dumps(obj, ensure_ascii=False).encode()


@pytest.fixture
def crafted(tmp_path):
    root = tmp_path / "corpora"
    (root / "exam").mkdir(parents=True)
    train = [
        line({**GOOD, "id": "ok-1"}),
        b'{"id": "broken", "question": ',  # malformed JSON
        line({"id": "no-question", "options": GOOD["options"], "answer": "A"}),  # missing field
        line({**GOOD, "id": "empty", "question": "   "}),  # empty text
        line({**GOOD, "id": "bad-letter", "answer": "E"}),  # answer letter not among the options
        line({**GOOD, "id": "long", "question": "很长" * 5000}),  # over-length record
        b'{"id": "latin1", "question": "\xe9\xe9", "options": {"A": "x", "B": "y"}, "answer": "A"}',  # not UTF-8
        b"[1, 2, 3]",  # JSON but not an object
        line({**GOOD, "id": "ok-dup", "question": "上消化道出血的表现取决于？"}),  # duplicate of ok-1
        line({**GOOD, "id": "leak", "question": "心肌梗死最常见的早期症状是"}),  # also a test question
        line({**GOOD, "id": "ok-2", "question": "肺炎的首选检查是"}),
    ]
    (root / "exam" / "train.jsonl").write_bytes(b"\n".join(train) + b"\n\n")
    test = [line({**GOOD, "id": "t-1", "question": "心肌梗死最常见的早期症状是 "})]
    (root / "exam" / "test.jsonl").write_bytes(b"\n".join(test) + b"\n")
    cfg = load_config([f"data.root={root}", f"run_root={tmp_path / 'runs'}", "data.max_record_chars=2000"])
    cfg.data.sources = [SourceSpec("exam/train.jsonl", "exam", "train"), SourceSpec("exam/test.jsonl", "exam", "test")]
    return cfg


def test_bad_input_is_skipped_counted_and_kept(ray_session, crafted):
    manifest = build_records(crafted)
    assert manifest["skipped"] == {"exam/train": {
        "malformed_json": 2, "missing_field:question": 1, "empty_text": 1, "answer_not_in_options": 1,
        "over_length": 1, "bad_encoding": 1}}
    skipped = [json.loads(x) for x in open(crafted.data_dir / "skipped.jsonl")]
    assert sorted(s["line"] for s in skipped) == [2, 3, 4, 5, 6, 7, 8]
    assert all(s["raw"] for s in skipped)  # the original line is kept, nothing is lost
    assert manifest["dropped"] == {"exam/train": {"duplicate": 1, "overlaps_test": 1}}

    train = pq.read_table(crafted.data_dir / "records" / "train" / "exam").to_pylist()
    assert sorted(r["id"] for r in train) == ["ok-1", "ok-2"]
    test = pq.read_table(crafted.data_dir / "records" / "test" / "exam").to_pylist()
    assert [r["id"] for r in test] == ["t-1"]
    assert manifest["records"] == {"test": {"exam": {"exam/test": 1}}, "train": {"exam": {"exam/train": 2}}}


def test_missing_source_file_is_a_clear_error(ray_session, crafted):
    crafted.data.sources.append(SourceSpec("exam/absent.jsonl", "exam", "test"))
    with pytest.raises(SourceError, match="absent.jsonl"):
        build_records(crafted)


def test_unreadable_source_file_is_a_clear_error(ray_session, crafted, monkeypatch):
    import os
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).endswith("test.jsonl") else real_access(p, m))
    with pytest.raises(SourceError, match="not readable: .*test.jsonl"):
        build_records(crafted)


def test_a_users_chats_in_each_format_become_records_and_what_does_not_fit_is_counted(ray_session, tmp_path):
    """A user's own data, declared in a config file: OpenAI chats, ShareGPT conversations and Alpaca records with
    its own field names, next to each other; each record that does not fit its format is skipped by reason."""
    root = tmp_path / "corpora"
    (root / "mine").mkdir(parents=True)

    def chat(i, split):
        return {"messages": [{"role": "user", "content": f"第{i}位患者：咳嗽{i}天，怎么办？"},
                             {"role": "assistant", "content": f"咳嗽{i}天，建议先做胸片。"}], "split": split}
    (root / "mine" / "chats.jsonl").write_bytes(b"\n".join(
        [line(chat(i, "train")) for i in range(3)] + [line(chat(9, "test")),
                                                      line({"messages": [{"role": "nurse", "content": "x"}]})]) + b"\n")
    (root / "mine" / "sharegpt.jsonl").write_bytes(b"\n".join(
        line({"conversations": [{"from": "human", "value": f"腹痛{i}小时"},
                                {"from": "gpt", "value": f"腹痛{i}小时，需查血常规。"}]}) for i in range(2)) + b"\n")
    (root / "mine" / "alpaca.jsonl").write_bytes(b"\n".join(
        [line({"问题": f"血压{140 + i}/90 是否偏高？", "回答": "偏高，属于1级高血压。"}) for i in range(2)]
        + [line({"问题": "只有问题"})]) + b"\n")
    config = tmp_path / "mine.yaml"
    config.write_text("""data:
  sources:
    - {path: mine/chats.jsonl, kind: chat, task: dialogue}
    - {path: mine/sharegpt.jsonl, kind: sharegpt, task: dialogue, split: valid}
    - {path: mine/alpaca.jsonl, kind: alpaca, task: community_qa, split: train,
       fields: {instruction: 问题, output: 回答}}
""")
    cfg = load_config([f"config={config}", f"data.root={root}", f"run_root={tmp_path / 'runs'}"])
    manifest = build_records(cfg)
    # Valid dialogues are PPO prompts too, cut at a doctor turn (a seeded data.rl_dialogue_fraction: here both).
    assert manifest["records"] == {"train": {"dialogue": {"mine/chats": 3}, "community_qa": {"mine/alpaca": 2}},
                                   "valid": {"dialogue": {"mine/sharegpt": 2}},
                                   "rl": {"dialogue": {"mine/sharegpt": 2}}, "test": {"dialogue": {"mine/chats": 1}}}
    assert manifest["skipped"] == {"mine/chats": {"bad_turn": 1}, "mine/alpaca": {"missing_field:回答": 1}}
    qa = pq.read_table(cfg.data_dir / "records" / "train" / "community_qa").to_pylist()
    assert sorted(r["messages"][0]["content"] for r in qa) == ["血压140/90 是否偏高？", "血压141/90 是否偏高？"]


def test_a_users_files_of_every_type_in_every_format_become_records(ray_session, tmp_path):
    """A CSV exam bank, Parquet diagnosis notes, a JSON array of conversational preference pairs, ranked responses,
    a `datasets` DatasetDict of chats and a folder of plain documents: records of the right task and split, and every row that
    does not fit counted by reason with its file and line."""
    import datasets
    import pyarrow as pa

    root = tmp_path / "corpora"
    (root / "mine" / "books").mkdir(parents=True)
    (root / "mine" / "exams.csv").write_bytes("\n".join([
        "题目,A,B,C,D,答案,科目",
        "高血压的诊断标准是,收缩压≥140,收缩压≥120,收缩压≥160,收缩压≥180,A,内科",
        '"糖尿病的首选检查,是",空腹血糖,糖化血红蛋白,心电图,胸片,"A、B",内科',
        "多出一列,a,b,c,d,A,内科,多余",
        "答案不在选项中,a,b,c,d,E,内科"]).encode() + b"\nlatin-1,\xe9\xe9,b,c,d,A,x\n")
    pq.write_table(pa.table({"主诉": ["发热三天", "头痛一周", "咳嗽"], "现病史": ["伴咽痛", None, "无"],
                             "诊断": ["急性扁桃体炎", "偏头痛", None], "split": ["train", "test", "train"]}),
                   root / "mine" / "notes.parquet")
    ask = {"role": "user", "content": "孕妇能用布洛芬吗？"}
    (root / "mine" / "prefs.json").write_text(json.dumps([
        {"chosen": [ask, {"role": "assistant", "content": "孕晚期禁用，请遵医嘱。"}],
         "rejected": [ask, {"role": "assistant", "content": "可以随便用。"}]},
        {"prompt": "感冒要吃抗生素吗？", "chosen": "病毒性感冒不需要。", "rejected": "要吃。"},
        {"prompt": [ask, {"role": "assistant", "content": "哪个孕期？"}, {"role": "user", "content": "孕晚期"}],
         "chosen": "禁用。", "rejected": "可以。"}], ensure_ascii=False))
    chat = [{"messages": [{"role": "user", "content": f"胃痛{i}天怎么办？"},
                          {"role": "assistant", "content": f"胃痛{i}天，建议查胃镜。"}]} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat[:2]),
                          "test": datasets.Dataset.from_list(chat[2:])}).save_to_disk(str(root / "mine" / "chats"))
    (root / "mine" / "ranked.jsonl").write_text(json.dumps(
        {"prompt": "头痛三天怎么办？", "responses": ["查头颅CT", "休息观察", "多喝热水"]}, ensure_ascii=False) + "\n")
    book = "\n".join(f"第{i}段：高血压患者应限制钠盐摄入，规律服药，定期监测血压。" for i in range(12))
    (root / "mine" / "books" / "train.jsonl").write_text(json.dumps({"text": book}, ensure_ascii=False) + "\n")
    config = tmp_path / "mine.yaml"
    config.write_text("""data:
  max_record_chars: 200
  sources:
    - {path: mine/exams.csv, kind: exam, split: test, fields: {question: 题目, answer: 答案, category: 科目}}
    - {path: mine/notes.parquet, kind: diagnosis, fields: {record: "主诉,现病史", diagnosis: 诊断}}
    - {path: mine/prefs.json, kind: preference, split: train}
    - {path: mine/ranked.jsonl, kind: ranked, split: train}
    - {path: mine/chats, kind: chat, task: community_qa}
    - {path: mine/books, kind: text}
""")
    cfg = load_config([f"config={config}", f"data.root={root}", f"run_root={tmp_path / 'runs'}"])
    manifest = build_records(cfg)
    assert manifest["records"] == {
        "train": {"diagnosis": {"mine/notes": 1}, "preference": {"mine/prefs": 2, "mine/ranked": 3}, "community_qa": {"mine/chats": 2},
                  "text": {"mine/books": 2}},
        "test": {"exam": {"mine/exams": 2}, "diagnosis": {"mine/notes": 1}, "community_qa": {"mine/chats": 1}}}
    assert manifest["skipped"] == {"mine/exams": {"malformed_csv": 1, "answer_not_in_options": 1, "bad_encoding": 1},
                                   "mine/notes": {"missing_field:诊断": 1}, "mine/prefs": {"multi_turn_prompt": 1}}
    skipped = [json.loads(x) for x in open(cfg.data_dir / "skipped.jsonl")]
    assert sorted((s["file"], s["line"]) for s in skipped if s["source"] == "mine/exams") == \
        [("mine/exams.csv", 4), ("mine/exams.csv", 5), ("mine/exams.csv", 6)]

    def read(split, task):
        return pq.read_table(cfg.data_dir / "records" / split / task).to_pylist()
    exams = sorted(read("test", "exam"), key=lambda r: r["id"])
    assert sorted(json.loads(r["meta"])["answer"] for r in exams) == ["A", "AB"]
    assert all(json.loads(r["meta"])["category"] == "内科" for r in exams)
    assert any("糖尿病的首选检查,是" in r["messages"][0]["content"] for r in exams)  # a quoted comma stays
    (note,) = read("train", "diagnosis")
    assert note["messages"][0]["content"].startswith("主诉：发热三天\n现病史：伴咽痛\n")
    assert note["messages"][1]["content"] == "诊断：急性扁桃体炎"
    prefs = {r["messages"][0]["content"]: (r["messages"][1]["content"], r["rejected"]) for r in read("train", "preference")
             if r["source"] == "mine/prefs"}
    assert prefs == {"孕妇能用布洛芬吗？": ("孕晚期禁用，请遵医嘱。", "可以随便用。"), "感冒要吃抗生素吗？": ("病毒性感冒不需要。", "要吃。")}
    pieces = [r["messages"][0]["content"] for r in read("train", "text")]
    assert all(len(p) <= 200 for p in pieces) and "\n".join(sorted(pieces, key=lambda p: int(p[1:p.index("段")]))) == book


def test_a_source_where_nothing_fits_fails_with_its_file_line_and_reason(ray_session, tmp_path):
    root = tmp_path / "corpora"
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "qa.jsonl").write_text("\n" + json.dumps({"instruction": "头痛怎么办", "output": "休息"}) + "\n")
    cfg = load_config([f"data.root={root}", f"run_root={tmp_path / 'runs'}"])
    cfg.data.sources = [SourceSpec("mine/qa.jsonl", "chat", task="dialogue")]
    with pytest.raises(SourceError, match=r"mine/qa .*mine/qa.jsonl line 2, is skipped as missing_field:messages"):
        build_records(cfg)


def test_deidentified_sources_hold_no_detail_in_records_skips_or_the_blocks_read(ray_session, tmp_path):
    """data.deidentify: a hospital's rows with ID and phone numbers, names and addresses; every record and skipped
    row holds placeholders instead, as does every block the read task hands to the object store (so its spill files
    too); the manifest counts the details per kind."""
    import ray.data

    from clinicalgpt.source_files import SourceRowsDatasource
    root = tmp_path / "corpora"
    (root / "ward").mkdir(parents=True)
    details = ["110105199003071237", "13812345678", "张三丰", "北京市海淀区中关村大街27号", "ZY20230012"]
    rows = [{"instruction": f"患者张三丰，身份证号110105199003071237，电话13812345678，咳嗽{i}天",
             "output": "建议查胸片。"} for i in range(3)]
    rows.append({"instruction": "住院号：ZY20230012，家住北京市海淀区中关村大街27号"})  # no output: skipped
    (root / "ward" / "notes.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    cfg = load_config([f"data.root={root}", f"run_root={tmp_path / 'runs'}", "data.deidentify=true"])
    cfg.data.sources = [SourceSpec("ward/notes.jsonl", "alpaca", "train", task="community_qa")]
    manifest = build_records(cfg)
    assert manifest["deidentified"] == {"address": 1, "id_number": 3, "name": 3, "phone": 3, "record_number": 1}
    records = [r for f in sorted((cfg.data_dir / "records").rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    written = json.dumps(records, ensure_ascii=False) + (cfg.data_dir / "skipped.jsonl").read_text()
    assert len(records) == 3 and "[身份证号]" in written and "[地址]" in written  # the skipped row's placeholders
    read = ray.data.read_datasource(SourceRowsDatasource([str(root / "ward" / "notes.jsonl")], deidentify=True))
    blocks = json.dumps(read.take_all(), ensure_ascii=False)
    for detail in details:
        assert detail not in written and detail not in blocks, detail
