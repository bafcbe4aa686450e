"""Predictions in the classify job's row shape, for the evaluation tests."""
from __future__ import annotations

LABELS = ["A", "B"]


def pred(item_id, label, gold, probs=None, follows=None, error=None) -> dict:
    return {"item_id": str(item_id), "label": label, "gold": gold, "probs": probs,
            "follows_instruction": follows, "error": error}


def seven_predictions() -> list[dict]:
    """(gold, predicted): AA AA AB BB BA B- CB; C is a class the model was never trained on."""
    return [pred(1, "A", "A"), pred(2, "A", "A"), pred(3, "B", "A"), pred(4, "B", "B"), pred(5, "A", "B"),
            pred(6, None, "B", error="no label in answer"), pred(7, "B", "C")]
