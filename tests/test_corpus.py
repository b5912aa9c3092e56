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
