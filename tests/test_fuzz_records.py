"""Generated bad input for the data pipeline (hypothesis): for every bundled corpus and every user format, rows of
random JSON, the format's own field names holding wrong types, huge and empty strings, control characters, deep
nesting and text that is not JSON; files of invalid UTF-8. Nothing crashes, every bad row is a skip with a reason
(and its raw text, for the report), every row is accounted for, and a good row among them gives the records it
gives alone."""

import csv
import io
import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinicalgpt.config import SourceSpec, load_config
from clinicalgpt.corpus import records_from_rows
from clinicalgpt.source_files import _csv_rows, _deidentified, _json_rows
from clinicalgpt.sources import BUILDERS, FORMATS

CFG = load_config([])
# Every bundled corpus, and every format with each task it may be read as.
KINDS = [(kind, "") for kind in BUILDERS] + [(kind, task) for kind, (_, tasks) in FORMATS.items() for task in tasks]
# The field names the builders read: generated objects use them, so wrong types reach the builders' own checks.
FIELDS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output", "text",
          "question", "options", "answer", "explanation", "record", "diagnosis", "disease_group", "prompt", "chosen",
          "rejected", "responses", "scores", "split", "id", "s", "p", "o", "turns", "title", "qa", "self_report",
          "preliminary_impression", "explicit_symptoms", "implicit_symptoms", "weak_label", "category"]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

strings = st.one_of(
    st.text(max_size=40),
    st.just(""), st.just("   \n\t"),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs"]), max_size=20),  # control and format chars
    st.sampled_from(["test", "train", "valid", "rl", "A", "AB", "user", "assistant", "human", "gpt", "医生", "患者"]))
huge = st.builds(lambda ch, n: ch * n, st.sampled_from(["痛", "a", "1", "a@", "\x00", "\n"]),
                 st.integers(10_000, 200_000))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=25)
objects = st.builds(lambda obj, field, text: {**obj, field: text} if text else obj,  # with at most one huge string
                    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8), st.sampled_from(FIELDS),
                    st.none() | huge)
not_json = st.one_of(
    st.text(max_size=60),
    st.integers(1, 100_000).map(lambda depth: "[" * depth + "]" * depth),  # deep nesting
    st.integers(1, 100_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.integers(1, 50_000).map(lambda digits: '{"id": ' + "9" * digits + "}"),  # an integer Python will not convert
    json_values.map(json.dumps))  # JSON, but not an object
rows = st.lists(st.one_of(objects.map(lambda o: json.dumps(o, ensure_ascii=False)), not_json), min_size=1, max_size=8)


def run(kind: str, task: str, texts: list[str], problems: list[str] | None = None) -> list[dict]:
    path = f"fuzz/{kind}-{task}.jsonl"
    batch = pa.table({"path": [path] * len(texts), "line": list(range(1, len(texts) + 1)), "text": texts,
                      "problem": problems or [""] * len(texts), "redacted": [""] * len(texts)})
    return records_from_rows(batch, {path: SourceSpec(path, kind, task=task)}, CFG, keep_test_only=False).to_pylist()


@pytest.mark.parametrize("kind, task", KINDS, ids=[f"{k}-{t}" if t else k for k, t in KINDS])
@FUZZ
@given(texts=rows)
def test_generated_rows_are_records_or_counted_skips(kind, task, texts):
    out = run(kind, task, texts)
    assert sum(r["n_inputs"] for r in out) == len(texts)  # every row accounted for, once
    for r in out:
        if r["skip"] and r["skip"] != "other_pass":  # a reason, and the row's text kept for the skip report
            assert r["messages"] == [] and r["raw"] == texts[int(r["id"].rsplit(":", 1)[1]) - 1][:2000]
        elif not r["skip"]:
            assert r["messages"] and all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
            assert r["split"] in ("train", "valid", "rl", "test")


@settings(FUZZ, max_examples=50)
@given(texts=rows)
def test_generated_rows_are_deidentified_without_a_crash(texts):
    """The read task de-identifies each row's text before any builder reads it (data.deidentify). In a test of its
    own, not in each corpus's test above: it does not depend on the corpus (twice their examples, once)."""
    for text in texts:
        _deidentified(text)


good_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zs", "Zl", "Zp"]), min_size=1,
                    max_size=200)


@FUZZ
@given(instruction=good_text, output=good_text, bad=rows, position=st.integers(0, 8))
def test_a_good_row_among_bad_ones_gives_the_records_it_gives_alone(instruction, output, bad, position):
    good = json.dumps({"instruction": instruction, "output": output, "split": "train"}, ensure_ascii=False)
    alone = [r for r in run("alpaca", "community_qa", [good]) if not r["skip"]]
    assert [m["content"] for m in alone[0]["messages"]] == [instruction.strip(), output.strip()]
    mixed = bad[:position] + [good] + bad[position:]
    among = [r for r in run("alpaca", "community_qa", mixed) if not r["skip"] and r["id"] == alone[0]["id"]]
    assert among[:1] == alone


lines = st.one_of(st.binary(max_size=60), st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x00\x00"]),
                  objects.map(lambda o: json.dumps(o, ensure_ascii=False).encode()), st.just(b""), st.just(b"  "))


@FUZZ
@given(body=st.lists(lines.map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), max_size=20))
def test_json_lines_files_of_any_bytes_are_read_line_by_line(body):
    """Every non-blank line is a row, numbered as in the file; one that is not UTF-8 is flagged bad_encoding."""
    data = b'{"first": 1}\n' + b"\n".join(body)
    got = list(_json_rows(pa.BufferReader(data)))
    want = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    assert [n for n, _, _ in got] == [n for n, _ in want]
    for (_, text, problem), (_, raw) in zip(got, want):
        try:
            assert (text, problem) == (raw.decode("utf-8"), "")
        except UnicodeDecodeError:
            assert problem == "bad_encoding" and text == raw.decode("utf-8", "replace")


@FUZZ
@given(cells=st.lists(st.lists(st.text(max_size=20) | st.binary(max_size=10), min_size=2, max_size=2), max_size=10))
def test_csv_files_of_any_cells_are_read_row_by_row(cells):
    """Rows of text and raw bytes under a header: each a row whose values are the cells, or a bad_encoding skip."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["question", "answer"])
    for row in cells:
        writer.writerow([c.decode("utf-8", "surrogateescape") if isinstance(c, bytes) else c for c in row])
    got = list(_csv_rows(pa.BufferReader(out.getvalue().encode("utf-8", "surrogateescape"))))
    for _, text, problem in got:
        assert problem in ("", "bad_encoding", "malformed_csv")
        if not problem:
            assert set(json.loads(text)) == {"question", "answer"}
