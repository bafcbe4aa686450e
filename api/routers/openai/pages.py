"""OpenAI's cursor lists: `{"object": "list", "data": [...], "first_id", "last_id", "has_more"}`.

The SDK's paginator asks again with `after=<last id>` while `has_more` is true, so every list route here
honours `after` and says `has_more` honestly.
"""
from __future__ import annotations

from typing import Any, Sequence


def cursor_page(data: Sequence[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": list(data), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
