"""Load: 10,000 classification items as 100 concurrent batches from several client processes.

Starts its own Redis and PostgreSQL (throwaway, on free ports), the real API and real Celery workers as
subprocesses, and a seeded tiny Llama (SmolLM2's tokenizer) in score mode. Prints JSON: GET /jobs/{id}
latency while the load runs (p50/p95/max), items stored, duplicates, wall time.

    python bench/load.py [--batches 100] [--batch-size 100] [--processes 4] [--workers 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import MODEL_CACHE, Stack, make_stack_env, make_tiny_llama  # noqa: E402
from tests.reliability.load import run_load, stored_counts  # noqa: E402
from tests.reliability.services import PostgresCluster, RedisServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="Celery workers on the gpu queue (-c 1 each)")
    args = ap.parse_args()
    tok_dir = MODEL_CACHE / "smollm2-135m"
    if not (tok_dir / "tokenizer.json").exists():
        sys.exit(f"{tok_dir} is missing: run the test suite once (it converts SmolLM2 there)")
    with tempfile.TemporaryDirectory(prefix="newslora-load-") as tmp:
        tmp = Path(tmp)
        model = make_tiny_llama(tmp / "tiny-llama", tok_dir)
        pg = PostgresCluster("bench-pw").init()
        redis = RedisServer(tmp / "redis").start()
        stack = None
        try:
            db_url = pg.create_database("load")
            (tmp / "home").mkdir()
            stack = Stack(make_stack_env(tmp / "home", database_url=db_url, broker_url=redis.url,
                                         NEWSLORA_WAIT_RETRIES="10"), tmp / "home")
            stack.start_api()
            for w in range(args.workers):
                stack.start_worker(f"w{w}", queues="gpu")
            out = run_load(stack.url, str(model), batches=args.batches, batch_size=args.batch_size,
                           processes=args.processes, timeout_s=3600)
            out.update(stored_counts(db_url, out.pop("job_ids")))
            out["workers"] = args.workers
            out["missing"] = out["items"] - out["distinct"]
            print(json.dumps(out, indent=2))
        finally:
            if stack is not None:
                stack.stop()
            redis.stop()
            pg.destroy()


if __name__ == "__main__":
    main()
