"""Queue overhead: latency from submit to `succeeded` for a no-op job, and jobs per second with one worker.

Runs the real API and one real worker (as subprocesses) twice: on Redis + PostgreSQL, and on the
embedded default (SQLite + kombu's SQLAlchemy transport). Prints JSON.

    python bench/queue_overhead.py [--jobs 200]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import PG_ADMIN_URL, REDIS_TEST_URL, Stack, make_stack_env  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure(stack: Stack, n: int) -> dict:
    c = stack.client()
    c.wait(c.submit_noop()["id"], timeout=60)  # warm up the worker
    # Latency: one job at a time, submit -> succeeded, from the row's own timestamps.
    lat = []
    for _ in range(n // 4):
        job = c.wait(c.submit_noop()["id"], timeout=60, poll_s=0.02)
        lat.append((datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"]))
                   .total_seconds() * 1000)
    # Throughput: n jobs submitted back to back, until the last one finishes.
    t0 = time.perf_counter()
    ids = [c.submit_noop()["id"] for _ in range(n)]
    submit_s = time.perf_counter() - t0
    for i in ids:
        c.wait(i, timeout=600, poll_s=0.05)
    total_s = time.perf_counter() - t0
    jobs = [c.get(i) for i in ids]
    e2e = [(datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["created_at"])).total_seconds() * 1000
           for j in jobs]
    return {"latency_ms_p50": round(statistics.median(lat), 1), "latency_ms_p95": round(_pct(lat, 0.95), 1),
            "latency_samples": len(lat), "jobs": n, "jobs_per_s": round(n / total_s, 1),
            "submit_per_s": round(n / submit_s, 1), "backlog_latency_ms_p50": round(statistics.median(e2e), 1),
            "all_succeeded": all(j["status"] == "succeeded" for j in jobs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    args = ap.parse_args()
    out = {"what": "no-op job, one worker (prefork, concurrency 1), API over HTTP on loopback"}
    import uuid
    from sqlalchemy import create_engine, text
    import redis
    name = f"newslora_bench_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    pg = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    redis.Redis.from_url(REDIS_TEST_URL).flushdb()
    try:
        for label, db_url, broker in (("redis_postgres", pg, REDIS_TEST_URL), ("embedded_sqlite", None, None)):
            with tempfile.TemporaryDirectory() as home:
                st = Stack(make_stack_env(Path(home), database_url=db_url, broker_url=broker), Path(home))
                try:
                    st.start_api()
                    st.start_worker()
                    out[label] = measure(st, args.jobs)
                finally:
                    st.stop()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    r, e = out["redis_postgres"], out["embedded_sqlite"]
    out["ratio_jobs_per_s_redis_over_embedded"] = round(r["jobs_per_s"] / e["jobs_per_s"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
