"""The main job end to end on a tiny model and tiny data, through a real worker on Redis + PostgreSQL."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import AG_NEWS_DIR

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def tiny_pipeline(model_dir: Path, **over) -> dict:
    spec = {
        "name": "tiny",
        "model": str(model_dir),
        "prep": {"name": "tiny-agnews", "train": {"path": str(AG_NEWS_DIR / "train.jsonl")},
                 "test": {"path": str(AG_NEWS_DIR / "test.csv")}, "max_per_class": 12, "test_max_per_class": 5,
                 "validation_fraction": 0.1},
        "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "save_every": 2,
                  "val_samples": 4, "max_seq_len": 96, "dtype": "fp32"},
        "classify": {"batch_size": 8, "dtype": "fp32"},
        "generate": {"max_new_tokens": 3, "dtype": "fp32"},
        "generate_limit": 4,
        "judge": {"backend": "local", "judge_model": str(model_dir), "sample": 2, "max_new_tokens": 8,
                  "answer_max_new_tokens": 4, "dialogue": True},
    }
    spec.update(over)
    return spec


def test_pipeline_runs_to_a_stored_evaluation(redis_pg_stack, tiny_model_dir):
    c = redis_pg_stack.client()
    job = c.submit_pipeline(tiny_pipeline(tiny_model_dir))
    done = c.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", (done["error"], redis_pg_stack.log("worker")[-4000:])
    kids = {k["idempotency_key"].rsplit(":", 1)[1]: k for k in (c.get(i) for i in done["children"])}
    assert set(kids) == {"prep", "train", "classify_base", "classify_adapter", "generate_base", "generate_adapter",
                         "judge_base", "judge_adapter", "dialogue_base", "dialogue_adapter", "evaluate"}
    assert all(k["status"] == "succeeded" and k["parent_id"] == job["id"] for k in kids.values())
    assert kids["train"]["queue"] == "gpu" and kids["evaluate"]["queue"] == "cpu"
    # 5 test articles a class: every one classified once by each model, every label valid.
    for stage in ("classify_base", "classify_adapter"):
        preds = c.predictions(kids[stage]["id"], limit=1000)
        assert preds["total"] == 20
        assert {p["label"] for p in preds["items"]} <= {"World", "Sports", "Business", "Sci/Tech"}
        assert all(abs(sum(p["probs"].values()) - 1) < 1e-3 for p in preds["items"])
    assert len(c.judge_scores(kids["judge_adapter"]["id"])) == 2
    ev = c.evaluation(done["result"]["evaluation_id"])
    assert set(ev["document"]["models"]) == {"base", "fine-tuned"}
    assert ev["document"]["models"]["base"]["n"] == 20
    assert "fine-tuned" in ev["document"]["comparisons"]
    assert Path(ev["report_path"]).exists()
    adapter = c.model(done["result"]["adapter_id"])
    assert adapter["kind"] == "adapter" and adapter["dataset_hash"] == c.dataset(done["result"]["dataset_id"])["hash"]

    # The CLI reads the same results back (it talks to the API, never the database).
    import os, subprocess, sys
    env = dict(os.environ, NEWSLORA_API_URL=redis_pg_stack.url, NEWSLORA_HOME=str(redis_pg_stack.log_dir))
    cli = [sys.executable, "-m", "api_client.cli"]
    shown = subprocess.run(cli + ["eval", "show", str(ev["id"])], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "fine-tuned" in shown.stdout and "accuracy" in shown.stdout.lower(), shown.stderr
    out = redis_pg_stack.log_dir / "cli-report"
    rep = subprocess.run(cli + ["eval", "report", str(ev["id"]), "--out", str(out)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and (out / "report.html").exists(), rep.stderr
    tree = subprocess.run(cli + ["jobs", "show", str(job["id"])], env=env, capture_output=True, text=True, timeout=120)
    assert tree.returncode == 0 and "children:" in tree.stdout and "evaluate" in tree.stdout

    # The same spec again reuses the prepared dataset (no second prep job).
    again = c.wait(c.submit_pipeline(tiny_pipeline(tiny_model_dir, judge=None, generate_limit=0,
                                                   reuse_adapter=True))["id"], timeout=600)
    assert again["status"] == "succeeded", again["error"]
    stages = again["result"]["stages"]
    assert stages["prep"]["reused"] and stages["prep"]["dataset_id"] == done["result"]["dataset_id"]
    assert stages["train"]["reused"] and stages["train"]["adapter_id"] == done["result"]["adapter_id"]


def test_failed_child_fails_the_pipeline_and_cancel_reaches_children(redis_pg_stack, tiny_model_dir):
    c = redis_pg_stack.client()
    bad = tiny_pipeline(tiny_model_dir, judge=None, generate_limit=0)
    bad["train"] = {**bad["train"], "lora": {"target_modules": ["no_such_proj"]}}
    job = c.wait(c.submit_pipeline(bad)["id"], timeout=600)
    assert job["status"] == "failed"
    assert "stage train" in job["error"] and "no_such_proj" in job["error"]

    slow = tiny_pipeline(tiny_model_dir, judge=None, generate_limit=0)
    slow["train"] = {**slow["train"], "max_steps": 500, "save_every": 50}
    job = c.submit_pipeline(slow)
    deadline = time.monotonic() + 300
    while True:
        kids = [c.get(i) for i in c.get(job["id"])["children"]]
        if any(k["kind"] == "train" and k["status"] == "running" for k in kids):
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    c.cancel(job["id"])
    done = c.wait(job["id"], timeout=120)
    assert done["status"] == "cancelled"
    kids = [c.get(i) for i in done["children"]]
    assert all(k["status"] in ("cancelled", "succeeded") for k in kids)
    assert any(k["kind"] == "train" and k["status"] == "cancelled" for k in kids)
