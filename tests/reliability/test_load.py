"""Load: classification batches submitted at once from several client processes, against a real API and
real workers on Redis and PostgreSQL. Every item is stored once; the API answers GETs quickly meanwhile.

The full 10,000-item run (100 batches x 100) is `python bench/load.py`; CI runs 2,000 (20 x 100).
"""
from __future__ import annotations

import json

import pytest

from tests.reliability.load import batch_items, run_load, stored_counts

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.mark.slow
def test_concurrent_batches_from_several_processes_are_all_stored_once(rel_stack_factory, tiny_model_dir,
                                                                       rel_db_url):
    st = rel_stack_factory()
    st.start_api()
    st.start_worker("w1", queues="gpu")
    batches, size = 20, 100
    out = run_load(st.url, str(tiny_model_dir), batches=batches, batch_size=size, processes=4, timeout_s=240)
    print("load:", json.dumps({k: v for k, v in out.items() if k != "job_ids"}))
    assert out["unfinished"] == 0 and out["statuses"] == {"succeeded": batches}, st.log("w1")[-3000:]
    counts = stored_counts(rel_db_url, out["job_ids"])
    assert counts == {"stored": batches * size, "distinct": batches * size, "duplicates": 0,
                      "labelled": batches * size}
    # Each batch holds exactly its own items, and resubmitting a batch (same key) creates nothing.
    c = st.client()
    first = out["job_ids"][0]
    assert {p["item_id"] for p in c.iter_predictions(first)} == {it["id"] for it in batch_items(0, size)}
    again = c.submit_classify({"items": batch_items(0, size), "model": str(tiny_model_dir), "mode": "score",
                               "batch_size": 50, "dtype": "fp32", "device": "cpu"},
                              idempotency_key="load-batch-0")
    assert again["id"] == first and c.list(kind="classify")["total"] == batches
    # The API stayed responsive while the worker was saturated (2 shared cores here: a loose bound).
    assert out["get_p95_ms"] < 1000, out
