"""A record's fields checked the same way in every format: each problem names its field."""

from __future__ import annotations

from typing import Any


def field(record: dict, name: str, kind: type, *, non_empty: bool = False) -> Any:
    """`record[name]`, which must be of `kind` (and not empty where asked)."""
    if name not in record or record[name] is None:
        raise ValueError(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        article = {list: "a list", bool: "a boolean (true or false)"}.get(kind, "a string")
        raise ValueError(f"field {name!r} must be {article}, got {type(value).__name__}")
    if non_empty and not value:
        raise ValueError(f"field {name!r} must not be empty")
    return value


def chat_messages(record: dict, name: str) -> list[dict]:
    """`record[name]` as chat messages: a non-empty list of objects with a string `role` and
    `content`. Keys parquet fills with None for a row that lacks them are dropped (chat
    templates may test whether a key is defined)."""
    messages = field(record, name, list, non_empty=True)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{name}[{i}] must be an object, got {type(message).__name__}")
        field(message, "role", str)
        field(message, "content", str)
    return [{k: v for k, v in m.items() if v is not None} for m in messages]
