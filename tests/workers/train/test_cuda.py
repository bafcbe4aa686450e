"""CUDA-only checks (bench/gpu_check.sh runs them on a GPU machine; skipped elsewhere)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_train_and_classify_on_cuda(tiny_model_dir, tmp_path, ag_news_dir):
    from core.context import LocalContext
    from workers.inference.classify import AdapterRef, classify_items, get_engine
    from workers.data.prep import prepare_dataset
    from core.specs import ClassifySpec, PrepSpec, SourceSpec, TrainSpec
    from workers.train import train_adapter

    ds = tmp_path / "ds"
    prepare_dataset(PrepSpec(train=SourceSpec(path=str(ag_news_dir / "train.jsonl")),
                             test=SourceSpec(path=str(ag_news_dir / "test.csv")), max_per_class=8,
                             test_max_per_class=4), ds, LocalContext())
    result = train_adapter(TrainSpec(dataset_id=1, model=str(tiny_model_dir), max_steps=4, batch_size=4,
                                     device="cuda", dtype="bf16", eval_every=2, save_every=2, val_samples=4),
                           ds, tmp_path / "out", LocalContext())
    assert result.metrics.device.startswith("cuda")
    items = [{"id": str(i), "text": t, "seq": i} for i, t in enumerate(["Stocks fell.", "The team won."])]
    spec = ClassifySpec(items=[{"id": "x", "text": "x"}], device="cuda", dtype="bf16")
    engine = get_engine(str(tiny_model_dir), dtype="bf16", device="cuda")
    ctx = LocalContext()
    classify_items(items, engine=engine, model_ref=str(tiny_model_dir),
                   adapter=AdapterRef(adapter_id=1, path=Path(result.adapter_dir)),
                   label_names=result.label_names, instruction=result.instruction,
                   template=result.template, spec=spec, ctx=ctx)
    assert len(ctx.predictions) == 2
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-2 for p in ctx.predictions.values())
