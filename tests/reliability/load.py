"""Load driver shared by tests/reliability/test_load.py and bench/load.py.

Several client processes (multiprocessing, each with its own Client) submit classification batches at
once; meanwhile this process times `GET /jobs/{id}` on the submitted jobs until every job has finished.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import time
from typing import Any

TOPICS = ["stocks fell as the central bank raised rates", "the striker scored twice in the final",
          "a new chip doubles battery life", "leaders met to discuss the ceasefire"]


def batch_items(batch: int, size: int) -> list[dict[str, str]]:
    return [{"id": f"b{batch}-{i}", "text": f"{TOPICS[(batch + i) % 4]} (batch {batch}, item {i})"}
            for i in range(size)]


def _submit(args: tuple[str, str | None, str, list[int], int]) -> list[tuple[int, int]]:
    """One client process: submit its batches as fast as it can. Returns (batch, job id) pairs."""
    url, token, model, batches, size = args
    from api_client.client import Client
    out = []
    with Client(url, token=token) as c:
        for b in batches:
            job = c.submit_classify({"items": batch_items(b, size), "model": model, "mode": "score",
                                     "batch_size": 50, "dtype": "fp32", "device": "cpu"},
                                    idempotency_key=f"load-batch-{b}")
            out.append((b, job["id"]))
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_load(url: str, model: str, *, batches: int, batch_size: int, processes: int, token: str | None = None,
             timeout_s: float = 600) -> dict[str, Any]:
    """Submit `batches` x `batch_size` items from `processes` client processes and wait for all of them.

    Returns:
        wall time, submit time, GET /jobs/{id} latency percentiles (ms) measured while the load ran,
        job statuses, and the job ids by batch.
    """
    import httpx
    chunks = [list(range(p, batches, processes)) for p in range(processes)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        pending = pool.map_async(_submit, [(url, token, model, ch, batch_size) for ch in chunks])
        http = httpx.Client(base_url=url, timeout=30,
                            headers={"Authorization": f"Bearer {token}"} if token else {})
        latencies: list[float] = []
        job_ids: list[int] = []
        while not pending.ready():  # time GETs while the clients are still submitting
            ids = [j["id"] for j in http.get("/jobs", params={"limit": 5}).json()["items"]]
            for jid in ids[:2]:
                t = time.perf_counter()
                assert http.get(f"/jobs/{jid}").status_code == 200
                latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
        pairs = [p for chunk in pending.get() for p in chunk]
    submit_s = time.perf_counter() - t0
    job_ids = [j for _, j in sorted(pairs)]
    status: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(status) < len(job_ids) and time.monotonic() < deadline:
        for jid in random.sample(job_ids, len(job_ids)):
            if jid in status:
                continue
            t = time.perf_counter()
            r = http.get(f"/jobs/{jid}")
            latencies.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
            if r.json()["status"] in ("succeeded", "failed", "cancelled"):
                status[jid] = r.json()["status"]
            time.sleep(0.02)
    wall_s = time.perf_counter() - t0
    http.close()
    return {"items": batches * batch_size, "batches": batches, "processes": processes, "wall_s": round(wall_s, 2),
            "submit_s": round(submit_s, 2), "items_per_s": round(batches * batch_size / wall_s, 1),
            "get_requests": len(latencies), "get_p50_ms": round(statistics.median(latencies), 1),
            "get_p95_ms": round(_pct(latencies, 0.95), 1), "get_max_ms": round(max(latencies), 1),
            "statuses": {s: list(status.values()).count(s) for s in set(status.values())},
            "unfinished": len(job_ids) - len(status), "job_ids": job_ids}


def stored_counts(db_url: str, job_ids: list[int]) -> dict[str, int]:
    """Predictions stored for these jobs: rows, distinct (job, item) pairs, and rows beyond one per item."""
    from sqlalchemy import create_engine, text
    eng = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    ids = ",".join(map(str, job_ids))
    with eng.connect() as c:
        rows = c.execute(text(f"SELECT count(*) FROM predictions WHERE job_id IN ({ids})")).scalar()
        distinct = c.execute(text("SELECT count(*) FROM (SELECT DISTINCT job_id, item_id FROM predictions "
                                  f"WHERE job_id IN ({ids})) d")).scalar()
        labelled = c.execute(text(f"SELECT count(*) FROM predictions WHERE job_id IN ({ids}) AND label IS NOT NULL "
                                  "AND error IS NULL")).scalar()
    eng.dispose()
    return {"stored": int(rows), "distinct": int(distinct), "duplicates": int(rows - distinct),
            "labelled": int(labelled)}
