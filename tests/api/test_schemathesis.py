"""The HTTP API against its own OpenAPI schema, checked by Schemathesis (a tool nobody here wrote).

The real API (uvicorn on loopback, started here) on the embedded default - SQLite store, SQLAlchemy broker,
the path `make demo` takes - and on PostgreSQL + Redis (their limits differ: ids are 32-bit on PostgreSQL),
with one row of every kind in the store, so reads of existing rows are checked against their response
schemas too. `schemathesis run` with every check runs every phase (examples, coverage,
fuzzing, stateful: the last follows the schema's links from list and create answers to the rows they name)
with a bounded number of examples per operation and a fixed seed; any failure fails the test with
Schemathesis's own report (each failure has a curl line that reproduces it).

NEWSLORA_SCHEMATHESIS_EXAMPLES and NEWSLORA_SCHEMATHESIS_SEED change the bound and the seed (e.g. a long
run before a release).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("NEWSLORA_SCHEMATHESIS_EXAMPLES", "30"))
SEED = int(os.environ.get("NEWSLORA_SCHEMATHESIS_SEED", "20261128"))
# No worker runs here: /v1/chat/completions and /v1/completions wait this long for one, then answer 429.
NO_WORKER_WAIT = {"NEWSLORA_OPENAI_SYNC_TIMEOUT_S": "0.2"}
API_TOKEN = "schemathesis-admin-token"  # the run authenticates as the bootstrap admin (NEWSLORA_API_TOKEN)


def _seed_store(database_url: str, home: Path) -> None:
    """One job with a child, events, predictions and judge rows, one dataset, one adapter with one export (its
    folder under `home`, so it downloads), one evaluation (each row as its writer stores it: see db/results.py)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from db.models import Dataset, Evaluation, Job, JobEvent, JudgeScore, ModelArtifact, Prediction
    engine = create_engine(database_url)
    with Session(engine) as s, s.begin():
        job = Job(kind="classify", queue="gpu", status="succeeded", spec={"items": [{"id": "a", "text": "x"}]},
                  result={"classified": 2}, progress=1.0, code_version="test")
        s.add(job)
        s.flush()
        s.add(Job(kind="noop", queue="cpu", status="running", spec={}, parent_id=job.id, progress=0.5,
                  progress_info={"step": 1}))
        s.add(JobEvent(job_id=job.id, level="info", message="queued", metrics={"queue": "gpu"}))
        s.add_all([Prediction(job_id=job.id, seq=0, item_id="a", label="World", gold="World",
                              probs={"World": 0.9, "Sports": 0.1}, latency_ms=3.5, flags=[], model="m"),
                   Prediction(job_id=job.id, seq=1, item_id="b", flags=[], error="empty text")])
        s.add(JudgeScore(job_id=job.id, item_id="a", status="scored", coherence=4.0, following=5.0,
                         judge_backend="ollama", judge_digest="sha256:0", extra={}))
        ds = Dataset(job_id=job.id, name="agnews", path="/tmp/ds", hash="0" * 64, spec_hash="1" * 64,
                     spec={"label_names": ["World"]}, meta={"records": 2})
        s.add(ds)
        s.flush()
        adapter = ModelArtifact(kind="adapter", name="lora", base_model="smollm2-135m", path="/tmp/a", hash="2" * 64,
                                spec={"rank": 8}, dataset_id=ds.id, dataset_hash=ds.hash, metrics={"loss": 1.0})
        s.add(adapter)
        s.flush()
        export = home / "exports" / "seeded"
        export.mkdir(parents=True)
        (export / "adapter_config.json").write_text("{}")
        s.add(ModelArtifact(kind="export", source_adapter_id=adapter.id, name="lora-peft", base_model="smollm2-135m",
                            path=str(export), hash="3" * 64, spec={"format": "peft"}, metrics={"verified": True}))
        s.add(Evaluation(name="eval", spec={}, document={"accuracy": 0.5}, report_path=None))
        # /v1: one uploaded batch file (its bytes under the home) and one finished batch over it.
        from db.models import Batch, StoredFile
        line = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
        (home / "files").mkdir(exist_ok=True)
        (home / "files" / "file-000000000000000000000001").write_bytes(line)
        s.add(StoredFile(id="file-000000000000000000000001", filename="batch.jsonl", purpose="batch",
                         bytes=len(line), sha256="4" * 64, path=str(home / "files" / "file-000000000000000000000001")))
        s.add(Batch(id="batch_000000000000000000000001", endpoint="/v1/completions", completion_window="24h",
                    input_file_id="file-000000000000000000000001", status="completed", total=1, completed=1,
                    failed=0))
        # ... one batch still running (its job queued), so a cancel has something to stop; and a fine-tune the
        # admin this run authenticates as owns, so DELETE /v1/models/{model} has one to delete.
        from db import auth
        admin = auth.ensure_user(auth.BOOTSTRAP_ADMIN, role="admin", session=s)
        running = Job(kind="classify", queue="gpu", status="queued", spec={"items": [{"id": "a", "text": "x"}]},
                      owner_id=admin.id)
        s.add(running)
        s.flush()
        s.add(Batch(id="batch_000000000000000000000002", endpoint="/v1/completions", completion_window="24h",
                    input_file_id="file-000000000000000000000001", status="in_progress", total=1, completed=0,
                    failed=0, job_id=running.id, owner_id=admin.id))
        trained = Job(kind="train", queue="gpu", status="succeeded", spec={}, owner_id=admin.id)
        s.add(trained)
        s.flush()
        s.add(ModelArtifact(kind="adapter", name="owned-lora", base_model="smollm2-135m", path="/tmp/b",
                            spec={"suffix": "mine"}, job_id=trained.id))
        # ... and one fine-tuning job (a view of a finished pipeline), so its item routes are reached.
        from db.models import FineTuningJob
        pipeline = Job(kind="pipeline", queue="cpu", status="queued", spec={}, owner_id=admin.id)
        s.add(pipeline)
        s.flush()
        s.add(FineTuningJob(id="ftjob-000000000000000000000001", owner_id=admin.id, job_id=pipeline.id,
                            model="smollm2-135m", training_file="file-000000000000000000000001", seed=0,
                            hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0},
                            method={"type": "supervised"}))
    engine.dispose()


def _operation_count(openapi: dict) -> int:
    """Operations in an OpenAPI document: one per (path, HTTP method)."""
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return sum(1 for item in openapi["paths"].values() for method in item if method in methods)


@pytest.fixture(params=["embedded", "postgres"])
def api_stack(request, stack_factory):
    """The real API with one row of each kind: embedded (SQLite + SQLAlchemy broker) or PostgreSQL + Redis."""
    if request.param == "embedded":
        # neither DATABASE_URL nor BROKER_URL: the embedded default. With a token (Schemathesis sends it): a token
        # made by POST /tokens during the run would end a single-user mode the run relied on.
        st = stack_factory(NEWSLORA_API_TOKEN=API_TOKEN, **NO_WORKER_WAIT)
        st.start_api()  # creates the store (migrated to head)
        home = Path(st.env["NEWSLORA_HOME"])
        _seed_store(f"sqlite:///{home / 'newslora.sqlite'}", home)
        return st
    pg_url, redis_url = request.getfixturevalue("pg_url"), request.getfixturevalue("redis_url")
    from sqlalchemy import create_engine, text
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as c:  # a clean schema: the API migrates it
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    st = stack_factory(database_url=pg_url, broker_url=redis_url, NEWSLORA_API_TOKEN=API_TOKEN, **NO_WORKER_WAIT)
    st.start_api()
    _seed_store(pg_url.replace("postgresql://", "postgresql+psycopg://"), Path(st.env["NEWSLORA_HOME"]))
    return st


def test_the_api_conforms_to_its_openapi_schema(api_stack, tmp_path):
    st = api_stack
    # Every check runs: Schemathesis's default, as `--checks all` would, except that the flag would also
    # override the one per-operation exception in schemathesis.toml (see the test below).
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
           f"{st.url}/openapi.json", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
           "--workers", "1", "--request-timeout", "20", "--no-color",
           "--header", f"Authorization: Bearer {API_TOKEN}"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_COLOR": "1"})
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"Schemathesis found failures (seed {SEED}):\n{out[-20000:]}"
    # It really ran: every operation the schema has tested (a route added without coverage fails here), and
    # many requests made (not a schema it could not load).
    operations = _operation_count(httpx.get(f"{st.url}/openapi.json", timeout=10,
                                            headers={"Authorization": f"Bearer {API_TOKEN}"}).json())
    assert re.search(r"Selected: (\d+)/(\d+)", out)[0] == f"Selected: {operations}/{operations}", out[-3000:]
    assert re.search(r"Tested: (\d+)", out) and int(re.search(r"Tested: (\d+)", out)[1]) == operations, out[-3000:]
    # The stateful phase followed the schema's links from list and create answers to the rows they name.
    links = re.search(r"API Links: +(\d+) covered", out)
    assert links and int(links[1]) >= 1, out[-3000:]
    # ... so no operation is reached only with ids that do not exist, and the schema says what the server takes.
    # ... except DELETE /v1/models/{model}: the run deletes the seeded fine-tunes it reaches through the list's
    # link, after which the names it tries are base models (403, not deletable) or gone (404).
    if "Missing test data:" in out:
        block = out.split("Missing test data:", 1)[1].split("💡", 1)[0]
        named = sorted({ln.strip() for ln in block.splitlines() if ln.strip().startswith("- ")})
        assert named == ["- DELETE /v1/models/{model}"], out[-6000:]
    # One operation may show a mismatch, and says why: a fine-tuning job names uploaded files, and a schema-valid
    # body naming files that do not exist is a 400 (OpenAI's answer), so generated bodies are mostly refused.
    if "Schema validation mismatch:" in out:
        block = out.split("Schema validation mismatch:", 1)[1].split("\n\n", 2)[1]
        assert [ln.strip() for ln in block.splitlines() if ln.strip().startswith("- ")] == \
            ["- POST /v1/fine_tuning/jobs"], out[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out)
    assert generated and int(generated[1]) >= 10 * EXAMPLES and generated[1] == generated[2], out[-3000:]
    print(f"schemathesis: {generated[1]} test cases generated, all passed (seed {SEED}, {EXAMPLES} examples/op)")
    assert "internal error" not in st.log("api")


def test_every_check_runs_on_every_operation_but_the_documented_exception():
    """schemathesis.toml turns off one check on three operations (negative data on POST /jobs and on the two
    multipart uploads: it says why);
    everything else runs every check Schemathesis has, as `--checks all` would."""
    import schemathesis
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.config import SchemathesisConfig
    from api.app import app
    load_all_checks()
    schema = schemathesis.openapi.from_dict(app.openapi(), config=SchemathesisConfig.from_path(CONFIG))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == _operation_count(app.openapi())
    off = {(op.method.upper(), op.path, name) for op in operations for phase in ("coverage", "fuzzing", "stateful")
           for name in CHECKS.get_all_names()
           if not schema.config.checks_config_for(operation=op, phase=phase).get_by_name(name=name).enabled}
    assert off == {("POST", "/jobs", "negative_data_rejection"), ("POST", "/v1/files", "negative_data_rejection"),
                   ("POST", "/files", "negative_data_rejection")}, off
