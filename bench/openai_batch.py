"""The /v1 layer's cost: 1,000 AG News requests through `/v1/batches` against a native classify job on the same
articles, model and labels, in the same run.

Starts the embedded default (SQLite + kombu's SQLAlchemy broker: no services) with the real API and one real
worker as subprocesses, and the real SmolLM2-135M-Instruct in score mode (`guided_choice` over the four labels).
Order A B B A: a batch, the native job (the batch's own classify spec, resubmitted), the native job, a batch;
each timed from the client's submit to the client seeing it done (the batch: `completed`, its output file
built), polled every 0.1 s. Prints JSON: items/s of each run, the batch/native ratio of the means, and the
load average before each run (an honest figure needs an idle machine: 1-min load < 0.5 before it starts).

    python bench/openai_batch.py [--requests 1000]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import AG_NEWS_DIR, Stack, make_stack_env, smollm2_checkpoint  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TOKEN = "bench-openai-batch"


def articles(n: int) -> list[str]:
    with (AG_NEWS_DIR / "test.csv").open(encoding="utf-8") as fh:
        return [f"{title} {desc}" for _, (_, title, desc) in zip(range(n), csv.reader(fh))]


def batch_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "smollm2-135m", "messages": [{"role": "user", "content": t}],
                                        "guided_choice": LABELS}}) + "\n" for i, t in enumerate(texts)).encode()


def run_batch(client, file_id: str, n: int) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    b = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "cancelled"):
        time.sleep(0.1)
        b = client.batches.retrieve(b.id)
    wall = time.perf_counter() - t0
    assert b.status == "completed" and b.request_counts.completed == n, b
    out = client.files.content(b.output_file_id).text.splitlines()
    labels = {json.loads(x)["custom_id"]: json.loads(x)["response"]["body"]["choices"][0]["message"]["content"]
              for x in out}
    return {"engine": "v1_batch", "wall_s": round(wall, 2), "items_per_s": round(n / wall, 2),
            "load_before": round(load, 2), "labels": labels}


def run_native(api, spec: dict, n: int) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    job = api.submit("classify", spec)
    job = api.wait(job["id"], timeout=3600, poll_s=0.1)
    wall = time.perf_counter() - t0
    assert job["status"] == "succeeded", job.get("error")
    labels = {p["item_id"]: p["label"] for p in api.iter_predictions(job["id"], page=1000)}
    assert len(labels) == n
    return {"engine": "native_classify", "wall_s": round(wall, 2), "items_per_s": round(n / wall, 2),
            "load_before": round(load, 2), "labels": labels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    from openai import OpenAI
    model_dir = smollm2_checkpoint()
    texts = articles(args.requests)
    with tempfile.TemporaryDirectory(prefix="newslora-v1-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        stack = Stack(make_stack_env(home, database_url=None, broker_url=None, NEWSLORA_API_TOKEN=TOKEN,
                                     NEWSLORA_SMOLLM2_135M_DIR=str(model_dir)), home)
        try:
            stack.start_api()
            stack.start_worker()
            api = stack.client()
            client = OpenAI(base_url=f"{stack.url}/v1", api_key=TOKEN, max_retries=0)
            f = client.files.create(file=("bench.jsonl", io.BytesIO(batch_bytes(texts))), purpose="batch")
            warm = client.files.create(file=("warm.jsonl", io.BytesIO(batch_bytes(texts[:16]))), purpose="batch")
            run_batch(client, warm.id, 16)  # the worker loads the model once
            runs = [run_batch(client, f.id, args.requests)]
            native_spec = next(j for j in api.list(kind="classify", limit=1)["items"])  # the batch's own job
            spec = api.get(native_spec["id"])["spec"]
            runs.append(run_native(api, spec, args.requests))
            runs.append(run_native(api, spec, args.requests))
            runs.append(run_batch(client, f.id, args.requests))
        finally:
            stack.stop()
    ref = runs[0]["labels"]
    same = all(r["labels"] == ref for r in runs)
    for r in runs:
        del r["labels"]
    mean = {e: sum(r["items_per_s"] for r in runs if r["engine"] == e) / 2 for e in ("v1_batch", "native_classify")}
    print(json.dumps({"requests": args.requests, "model": "smollm2-135m (score mode, bf16 auto)",
                      "store": "embedded default (SQLite + SQLAlchemy broker)", "runs": runs,
                      "mean_items_per_s": {k: round(v, 2) for k, v in mean.items()},
                      "batch_over_native": round(mean["v1_batch"] / mean["native_classify"], 3),
                      "labels_equal_across_runs": same, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
