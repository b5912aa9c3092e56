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
