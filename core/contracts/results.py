"""Job results that other parts read: what a classify job reports (the `result` of its job row)."""
from __future__ import annotations

from typing import Any

from core.contracts.base import Contract


class FailedItem(Contract):
    item_id: str
    seq: int = 0
    error: str


class ClassifyResult(Contract):
    """A classify job's result over ALL its stored items, whichever attempt classified them.

    `skipped_done` counts the items a re-delivered job found already stored by earlier attempts and
    skipped; `attempt_classified` / `seconds` / `items_per_s` describe this attempt's own work.
    """

    mode: str
    model: str
    adapter_id: int | None = None
    dataset_id: int | None = None
    label_names: list[str]
    template: str
    instruction: str | None = None
    total: int  # items submitted (valid ones; rejected are counted apart)
    classified: int  # items with a stored label or failure, all attempts together
    skipped_done: int = 0
    attempt_classified: int = 0
    seconds: float = 0.0
    items_per_s: float | None = None
    n_failed: int = 0
    failed: list[FailedItem] = []
    truncated: int = 0
    rejected: int = 0
    counts: dict[str, int] = {}
    n_gold: int | None = None
    accuracy: float | None = None
    following_rate: float | None = None
    shards: list[dict[str, Any]] | None = None  # sharded jobs: one entry per shard child
