"""The source files as rows for Ray Data: every row of every supported file as JSON text with its file and line,
so that one builder per format reads them all and every skipped row can be found again.

    .jsonl (or .json holding JSON Lines)  a line per row, streamed; a line that is not UTF-8 is passed on as a skip
    .json holding an array                an element per row (the file is read whole)
    .parquet, .arrow (datasets' files)    a table row per row
    .csv                                  a header, then a row per record (every value a string)
A folder is a `datasets` save_to_disk folder (its Arrow files; a DatasetDict's per split) or a folder of such
files; a file or subfolder named after a split (train, validation, test ...) gives its rows that split.

`ray.data.read_text` loads each file whole, decodes it strictly (one bad byte fails the job) and splits on Unicode
line separators that JSON strings may contain: JSON Lines are split on b"\\n" only here.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from .deidentify import deidentify, deidentify_value

CHUNK_BYTES = 1 << 20
SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")
# File and folder names that give their rows a split (as `datasets.load_dataset` names them), and the split.
SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "val": "valid",
               "test": "test", "rl": "rl"}


def source_files(path: Path) -> list[tuple[Path, str]]:
    """The files of a source path, each with the split its name gives ("" for none); [] when none is readable."""
    if path.is_file():
        return [(path, "")] if path.suffix in SUFFIXES else []
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: one folder per split
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [(f, SPLIT_NAMES.get(s, "")) for s in splits for f in sorted((path / s).glob("*.arrow"))]
    files = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file())
    if (path / "state.json").is_file():  # one Dataset: its Arrow shards
        files = [f for f in files if f.suffix == ".arrow"]
    return [(f, _split_of(f.relative_to(path))) for f in files]


def _split_of(relative: Path) -> str:
    for name in (relative.stem, *(p.name for p in relative.parents)):
        if name in SPLIT_NAMES:
            return SPLIT_NAMES[name]
    return ""


def row_count(path: str) -> int | None:
    """Rows of a file where cheap to know (the progress bar's total), else None."""
    if path.endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    if path.endswith(".arrow"):
        with pa.memory_map(path) as f:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(f))
    if path.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:
            if f.read(CHUNK_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                return None
            f.seek(0)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(CHUNK_BYTES), b""))
    return None


def _json(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


class SourceRowsDatasource(FileBasedDatasource):
    """Rows: path, line (the line of a JSON Lines or CSV file, else the row, 1-based), text (the row as JSON;
    the decodable part of an undecodable line), problem (why the row cannot be read, a skip reason; "" if none),
    redacted (with `deidentify`: the details replaced in the text, {kind: count} as JSON; "" if none). De-identified
    here, in the read task, so that no block with the details reaches the object store or its spill files."""

    def __init__(self, paths: list[str], deidentify: bool = False, block_rows: int = 4000, **kwargs):
        super().__init__(paths, **kwargs)
        self.deidentify, self.block_rows = deidentify, block_rows

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        if path.endswith(".parquet"):  # Parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: dict[str, list] = {"path": [], "line": [], "text": [], "problem": [], "redacted": []}
        for line, text, problem in self._rows(f, path):
            counts: Counter = Counter()
            if self.deidentify:
                text, counts = _deidentified(text)
            rows["path"].append(path)
            rows["line"].append(line)
            rows["text"].append(text)
            rows["problem"].append(problem)
            rows["redacted"].append(json.dumps(dict(counts)) if counts else "")
            if len(rows["line"]) >= self.block_rows:
                yield pa.table(rows)
                rows = {k: [] for k in rows}
        if rows["line"]:
            yield pa.table(rows)

    def _rows(self, f: pa.NativeFile, path: str) -> Iterator[tuple[int, str, str]]:
        if path.endswith(".parquet"):
            batches = pq.ParquetFile(f).iter_batches(batch_size=self.block_rows)
            yield from _table_rows(batches)
        elif path.endswith(".arrow"):
            yield from _table_rows(pa.ipc.open_stream(f))
        elif path.endswith(".csv"):
            yield from _csv_rows(f)
        else:
            yield from _json_rows(f)


def _deidentified(text: str) -> tuple[str, Counter]:
    """A row's text with every string in it de-identified (the text as it is where it is not JSON)."""
    counts: Counter = Counter()
    try:
        return _json(deidentify_value(json.loads(text), counts)), counts
    except (ValueError, RecursionError):  # not JSON, or JSON the parser refuses (a skip later): de-identified as text
        return deidentify(text)


def _table_rows(batches) -> Iterator[tuple[int, str, str]]:
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield n, _json(row), ""


def _csv_rows(f: pa.NativeFile) -> Iterator[tuple[int, str, str]]:
    """CSV rows as JSON objects of strings; a row with more values than the header is malformed_csv."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text, restkey="")
    start = 2
    for row in reader:
        line, start = start, reader.line_num + 1
        if not any(row.values()):
            continue
        obj = _json(row)
        if any(0xDC80 <= ord(ch) <= 0xDCFF for ch in obj):  # undecodable bytes, escaped
            yield line, obj.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "bad_encoding"
        else:
            yield line, obj, "malformed_csv" if "" in row else ""


def _json_rows(f: pa.NativeFile) -> Iterator[tuple[int, str, str]]:
    """A JSON array's elements, or JSON Lines: each non-blank line (blank ones still count in the numbering)."""
    head = f.read(CHUNK_BYTES).removeprefix(b"\xef\xbb\xbf")
    if head.lstrip().startswith(b"["):
        raw = head + f.read()
        try:
            items = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield 1, raw[:2000].decode("utf-8", "replace"), "malformed_json"  # the file as a whole
            return
        for i, item in enumerate(items, 1):
            yield i, _json(item), ""
        return
    lineno, tail = 0, head
    chunk = b""
    while True:
        *lines, tail = (tail + chunk).split(b"\n")
        for raw in lines:
            lineno += 1
            if raw.strip():
                yield (lineno, *_decoded(raw))
        chunk = f.read(CHUNK_BYTES)
        if not chunk:
            break
    if tail.strip():
        yield (lineno + 1, *_decoded(tail))


def _decoded(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), "bad_encoding"
