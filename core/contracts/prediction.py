"""`PredictionRow`: one classified item, as a classify job writes it and the store keeps it
(table `predictions`)."""
from __future__ import annotations

from typing import ClassVar

from core.contracts.base import StoreRow


class PredictionRow(StoreRow):
    """One item: its label (None when it failed), the label distribution in score mode, the response
    in generate mode, and what went wrong if anything. Failed items are stored, never dropped."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("item_id", "seq", "label", "gold", "probs", "response",
                                          "follows_instruction", "latency_ms", "flags", "error", "model",
                                          "adapter_id")
    EXTRA_COLUMN: ClassVar[str | None] = None

    item_id: str
    seq: int = 0  # the item's position in the submitted batch
    label: str | None = None
    gold: str | None = None
    probs: dict[str, float] | None = None
    response: str | None = None
    follows_instruction: bool | None = None
    latency_ms: float | None = None
    flags: list[str] = []
    error: str | None = None
    model: str | None = None
    adapter_id: int | None = None
