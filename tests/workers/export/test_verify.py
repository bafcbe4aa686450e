"""The export check's reference: an fp32 reference on a bf16 CPU is bf16 everywhere, fp32 again where it could differ."""
from __future__ import annotations

import csv

import pytest
import torch

from core.context import LocalContext
from core.specs.classify import ClassifySpec
from workers.export import verify
from workers.inference.classify import get_engine
from workers.modeling.registry import pick_dtype

from tests.workers.export.conftest import INSTRUCTION, LABELS

pytestmark = pytest.mark.skipif(pick_dtype("auto", "cpu") != torch.bfloat16, reason="needs a CPU with fast bf16")


@pytest.fixture(autouse=True)
def _fresh_reference_cache():
    yield
    verify._REFERENCE.clear()  # no test leaves labels computed under a patched margin for the next


@pytest.fixture(scope="module")
def items(ag_news_dir) -> list[dict]:
    with (ag_news_dir / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(40), csv.reader(f))]
    return [{"id": f"t{n}", "text": f"{t} {x}", "label": LABELS[int(c) - 1]} for n, (c, t, x) in enumerate(rows)]


def _reference(items, tiny_adapter, tiny_model_dir, tmp_path):
    verify._REFERENCE.clear()
    spec = ClassifySpec(dataset_id=1, mode="score", batch_size=16, dtype="fp32", device="cpu")
    return verify._reference_labels(items, adapter=tiny_adapter, base_model=str(tiny_model_dir), label_names=LABELS,
                                    instruction=INSTRUCTION, template="alpaca", spec=spec,
                                    ctx=LocalContext(work_dir=tmp_path))


def test_the_two_pass_reference_gives_fp32_labels(items, tiny_adapter, tiny_model_dir, tmp_path, monkeypatch):
    spec = ClassifySpec(dataset_id=1, mode="score", batch_size=16, dtype="fp32", device="cpu")
    fp32, _ = verify._classify(get_engine(str(tiny_model_dir), dtype="fp32", device="cpu"), items, adapter=tiny_adapter,
                               model_ref=str(tiny_model_dir), label_names=LABELS, instruction=INSTRUCTION,
                               template="alpaca", spec=spec, ctx=LocalContext(work_dir=tmp_path), what="fp32")
    labels, summary, how = _reference(items, tiny_adapter, tiny_model_dir, tmp_path)
    assert labels == fp32
    assert how.startswith(f"fp32 where bf16 could differ: bf16 on all {len(items)}, fp32 again on the ")
    assert summary["accuracy"] == sum(labels[it["id"]] == it["label"] for it in items) / len(items)

    # the margin decides what is rechecked: every article at an infinite margin, none at zero
    monkeypatch.setattr(verify, "FP32_RECHECK_MARGIN", float("inf"))
    labels, _, how = _reference(items, tiny_adapter, tiny_model_dir, tmp_path)
    assert labels == fp32 and f"fp32 again on the {len(items)} " in how
    monkeypatch.setattr(verify, "FP32_RECHECK_MARGIN", 0.0)
    bf16, _, how = _reference(items, tiny_adapter, tiny_model_dir, tmp_path)
    assert "fp32 again on the 0 " in how
    # (the bf16 labels themselves may differ from fp32's: that is what the recheck is for)
    assert set(bf16) == set(fp32)
