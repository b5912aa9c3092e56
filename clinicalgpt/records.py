"""The one record schema every corpus is turned into, and the keys used to deduplicate it.

A record is a chat: `messages` (role in system/user/assistant); the final assistant message is the
training target or, for evaluation records, the reference. Preference records add `rejected`, the
losing final assistant message. Task-specific facts (answer letter, diagnosis, disease group...)
live in `meta`, a JSON string, so every task shares one Parquet schema.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

import pyarrow as pa

TASKS = ("kg_qa", "community_qa", "exam", "dialogue", "diagnosis", "safety", "preference", "text")
SPLITS = ("train", "valid", "rl", "test")  # rl: prompts for PPO; test: evaluation only

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("rejected", pa.string()),
        ("meta", pa.string()),
    ]
)


class Skip(Exception):
    """Raised by a builder for an input line it cannot use; the message is the counted reason."""


def parse_object(text: str) -> dict:
    """A row's JSON object, or Skip: malformed_json (not JSON, JSON but not an object, or a number of more digits
    than Python converts), nested_too_deep (more levels than the parser recurses through)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise Skip("nested_too_deep") from None
    except ValueError:  # JSONDecodeError, or an integer over sys.get_int_max_str_digits()
        raise Skip("malformed_json") from None
    if not isinstance(obj, dict):
        raise Skip("malformed_json")
    return obj


def make_record(id: str, task: str, source: str, split: str, messages: list[dict], rejected: str | None = None,
                meta: dict | None = None) -> dict:
    assert task in TASKS and split in SPLITS, (task, split)
    return {
        "id": id,
        "task": task,
        "source": source,
        "split": split,
        "messages": messages,
        "rejected": rejected,
        "meta": json.dumps(meta or {}, ensure_ascii=False, sort_keys=True),
    }


def normalize(text: str) -> str:
    """Text as compared for duplicates: NFKC, lower case, letters and digits only."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def dedup_key(record: dict) -> int:
    """Same normalized content (all messages and the rejected reply) -> same key."""
    parts = [normalize(m["content"]) for m in record["messages"]] + [normalize(record.get("rejected") or "")]
    return _hash64("\x1f".join(parts))


LEAK_KEY_CHARS = 16


def leak_key(record: dict) -> int:
    """Key of the record's question: its user messages, normalized, from the first one on until the key
    has LEAK_KEY_CHARS characters (so that a dialogue opening with "嗯" is told apart by what follows).
    A training record that shares it with an evaluation record would let the model see the test item."""
    key = ""
    for m in record["messages"]:
        if m["role"] == "user":
            key += normalize(m["content"])
            if len(key) >= LEAK_KEY_CHARS:
                break
    return _hash64(key)


def stable_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def hash_fraction(*parts: str) -> float:
    """A deterministic number in [0, 1) for seeded choices that do not depend on processing order."""
    return int(stable_id(*parts), 16) / 16**16
