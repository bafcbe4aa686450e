"""Random ids for rows that are named by a string (files, batches, fine-tuning jobs, OpenAI responses):
a prefix and 24 hex digits, made and recognised in one place."""
from __future__ import annotations

import secrets

ID_HEX_DIGITS = 24


def new_id(prefix: str) -> str:
    """`prefix` + 24 random hex digits (96 bits), e.g. 'file-3f2a...'."""
    return prefix + secrets.token_hex(ID_HEX_DIGITS // 2)


def is_id(value: str, prefix: str) -> bool:
    """Whether `value` has the shape `new_id(prefix)` gives."""
    rest = value[len(prefix):]
    return value.startswith(prefix) and len(rest) == ID_HEX_DIGITS and all(c in "0123456789abcdef" for c in rest)
