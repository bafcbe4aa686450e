from __future__ import annotations

import pytest

from tests.workers.evaluation.predictions import seven_predictions


@pytest.fixture
def seven() -> list[dict]:
    """(gold, predicted): AA AA AB BB BA B- CB; C is a class the model was never trained on."""
    return seven_predictions()
