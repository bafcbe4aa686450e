"""Sharded classify jobs: split into shard children, one result and one listing, cancel cascades, real workers."""
from __future__ import annotations

import time

import pytest

from core.context import JobCancelled
from core.contracts.prediction import PredictionRow
from db import jobs as jobq
from db import results as resq
from db.session import session_scope
from workers.jobs.shards import ShardsPending, advance, shard_ranges, split
from core.specs.classify import ClassifySpec

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _news_items(n: int) -> list[dict]:
    topics = ["stocks fell as the central bank raised rates", "the striker scored twice in the final",
              "a new chip doubles battery life", "leaders met to discuss the ceasefire"]
    gold = ["Business", "Sports", "Sci/Tech", "World"]
    return [{"id": f"n{i}", "text": f"{topics[i % 4]} (report {i})", "label": gold[i % 4]} for i in range(n)]


def test_shard_ranges_cover_every_item_once():
    assert shard_ranges(10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    for n, size in [(1, 1), (7, 3), (4001, 4000), (1_000_000, 4000)]:
        ranges = shard_ranges(n, size)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) <= size


@pytest.fixture
def store(newslora_home, monkeypatch):
    """The embedded store, migrated; enqueues recorded instead of sent."""
    from db.session import init_db
    init_db()
    sent: list[int] = []
    import broker.app
    monkeypatch.setattr(broker.app, "enqueue", lambda job_id, kind, queue=None: sent.append(job_id))
    return sent


def _parent(spec: ClassifySpec) -> int:
    with session_scope() as s:
        job = jobq.create_job(session=s, kind="classify", queue="gpu", spec=spec.model_dump(mode="json"))
        assert jobq.claim(job.id, "w0", session=s, lease_s=30) == "claimed"
        return job.id


def _run_shard(child_id: int, worker: str) -> None:
    """What a worker does with a shard: claim it, store its items' predictions, record its result."""
    from workers.inference.items import load_items
    from workers.jobs.shards import is_shard
    with session_scope() as s:
        assert jobq.claim(child_id, worker, session=s, lease_s=30) == "claimed"
        child = s.get(jobq.Job, child_id)
        assert is_shard(child)
        spec = ClassifySpec.model_validate(child.spec)
    items, _ = load_items(spec, None)
    rows = [PredictionRow(item_id=it["id"], seq=it["seq"], label="Sports", gold=it["label"], model="m")
            for it in items]
    n_gold = len(items)
    correct = sum(it["label"] == "Sports" for it in items)
    result = {"mode": "score", "model": "m", "label_names": LABELS, "template": "alpaca", "total": len(items),
              "classified": len(items), "attempt_classified": len(items), "counts": {"Sports": len(items)},
              "n_gold": n_gold, "accuracy": correct / n_gold, "items_per_s": 10.0}
    with session_scope() as s:
        resq.save_predictions(child_id, rows, session=s)
        assert jobq.finish(child_id, "succeeded", session=s, result=result, worker=worker)


def test_split_runs_shards_and_reports_one_result_over_all(store):
    items = _news_items(10)
    spec = ClassifySpec(items=items, model="m")
    parent = _parent(spec)
    with pytest.raises(ShardsPending):
        split(parent, spec, len(items), shard_size=4)
    with session_scope() as s:
        kids = jobq.children(parent, session=s)
        specs = [ClassifySpec.model_validate(k.spec) for k in kids]
    assert [(sp.shard.start, sp.shard.stop, sp.shard.count) for sp in specs] == [(0, 3, 3), (3, 6, 3), (6, 10, 3)]
    assert [[it.id for it in sp.items] for sp in specs] == [[f"n{i}" for i in range(a, b)]
                                                            for a, b in [(0, 3), (3, 6), (6, 10)]]
    assert all(k.queue == "gpu" and k.kind == "classify" for k in kids) and store == [k.id for k in kids]
    with pytest.raises(ShardsPending):  # a re-run of the parent (its worker died) adds no second set
        split(parent, spec, len(items), shard_size=4)
    with session_scope() as s:
        assert len(jobq.children(parent, session=s)) == 3
    split(kids[0].id, specs[0], 3, shard_size=1)  # a shard is never split again: returns

    _run_shard(kids[0].id, "w1")
    assert advance(parent) == "running"
    with session_scope() as s:
        job = jobq.get_job(parent, session=s)
        assert job.progress == pytest.approx(3 / 10) and job.progress_info["done"] == 3
        assert job.progress_info["total"] == 10 and job.progress_info["shards_done"] == 1
    _run_shard(kids[1].id, "w2")
    _run_shard(kids[2].id, "w1")
    assert advance(parent) == "succeeded"
    with session_scope() as s:
        job = jobq.get_job(parent, session=s)
        rows, total = resq.predictions(parent, session=s, limit=100)
    assert total == 10 and [r.item_id for r in rows] == [f"n{i}" for i in range(10)]  # input order across shards
    res = job.result
    assert (res["total"], res["classified"], res["n_gold"], res["counts"]["Sports"]) == (10, 10, 10, 10)
    assert res["accuracy"] == pytest.approx(sum(it["label"] == "Sports" for it in items) / 10)
    assert [sh["job_id"] for sh in res["shards"]] == [k.id for k in kids]
    assert {sh["worker"] for sh in res["shards"]} == {"w1", "w2"}
    assert advance(parent) == "succeeded" and advance(kids[0].id) is None  # idempotent; a shard has no shards


def test_cancel_cascades_to_shards_and_a_failed_shard_fails_the_job(store):
    spec = ClassifySpec(items=_news_items(9), model="m")
    parent = _parent(spec)
    with pytest.raises(ShardsPending):
        split(parent, spec, 9, shard_size=3)
    with session_scope() as s:
        kids = [k.id for k in jobq.children(parent, session=s)]
        jobq.claim(kids[0], "w1", session=s, lease_s=30)  # one shard running, two queued
        jobq.request_cancel(parent, session=s)
    with session_scope() as s:
        assert [jobq.get_job(k, session=s).status for k in kids] == ["running", "cancelled", "cancelled"]
        assert jobq.get_job(kids[0], session=s).cancel_requested
    assert advance(parent) == "running"  # the running shard stops at its next batch, then reports
    with session_scope() as s:
        jobq.finish(kids[0], "cancelled", session=s, worker="w1")
    assert advance(parent) == "cancelled"

    parent = _parent(spec)
    with pytest.raises(ShardsPending):
        split(parent, spec, 9, shard_size=3)
    with session_scope() as s:
        kids = [k.id for k in jobq.children(parent, session=s)]
        jobq.claim(kids[0], "w1", session=s, lease_s=30)
        jobq.finish(kids[0], "failed", session=s, worker="w1",
                    error="AdapterError: adapter folder /x does not exist on this worker")
    assert advance(parent) == "running"  # the other shards are told to stop
    with session_scope() as s:
        assert [jobq.get_job(k, session=s).status for k in kids[1:]] == ["cancelled", "cancelled"]
    assert advance(parent) == "failed"
    with session_scope() as s:
        assert "shard 0" in jobq.get_job(parent, session=s).error and "/x does not exist" in \
            jobq.get_job(parent, session=s).error


def test_a_rerun_of_a_parent_that_a_cancel_overtook_makes_and_writes_nothing(store):
    """Found by the soak (issue #27): the parent's handler ran again (the broker was down sending its shards)
    after a cancel had ended it, and wrote "split into 3 shards" after its `cancelled` event."""
    spec = ClassifySpec(items=_news_items(9), model="m")
    parent = _parent(spec)
    with pytest.raises(ShardsPending):
        split(parent, spec, 9, shard_size=3)
    with session_scope() as s:
        jobq.request_cancel(parent, session=s)  # the queued shards are cancelled at once
    assert advance(parent) == "cancelled"
    with session_scope() as s:
        last = jobq.events(parent, session=s)[-1].id
    with pytest.raises(JobCancelled):
        split(parent, spec, 9, shard_size=3)  # the re-run
    with session_scope() as s:
        assert [e.message for e in jobq.events(parent, session=s, after_id=last)] == []
        assert len(jobq.children(parent, session=s)) == 3

    parent = _parent(spec)  # a cancel requested before the first split: no shard is made or sent
    with session_scope() as s:
        jobq.request_cancel(parent, session=s)
    sent = len(store)
    with pytest.raises(JobCancelled):
        split(parent, spec, 9, shard_size=3)
    with session_scope() as s:
        assert jobq.children(parent, session=s) == []
    assert len(store) == sent


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_two_real_workers_take_shards_and_a_killed_one_costs_only_its_shard(stack_factory, pg_url, redis_url,
                                                                          tiny_model_dir):
    """Real Celery workers on Redis + PostgreSQL: w1 takes shards alone and is SIGKILLed mid-shard; w2 and w3
    take the rest and the killed shard over. Every item is stored once, the job has one result and listing."""
    from sqlalchemy import create_engine, text
    eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    st = stack_factory(database_url=pg_url, broker_url=redis_url, NEWSLORA_CLASSIFY_SHARD_SIZE="40",
                       NEWSLORA_VISIBILITY_TIMEOUT_S="5")
    st.start_api()
    st.start_worker("w1", queues="gpu")
    c = st.client()
    n = 240
    job = c.submit_classify({"items": _news_items(n), "model": str(tiny_model_dir), "dtype": "fp32",
                             "device": "cpu", "batch_size": 1, "label_names": LABELS})
    deadline = time.monotonic() + 120
    while True:  # w1 is inside a shard: some of its items stored, not all
        with eng.connect() as conn:
            mid = conn.execute(text(
                "SELECT j.id, count(p.id) FROM jobs j LEFT JOIN predictions p ON p.job_id = j.id "
                f"WHERE j.parent_id = {job['id']} AND j.status = 'running' GROUP BY j.id")).all()
        mid = [(jid, k) for jid, k in mid if 0 < k < 30]
        if mid:
            break
        assert time.monotonic() < deadline, st.log("w1")[-3000:]
        time.sleep(0.05)
    st.kill("w1")  # SIGKILL, mid-shard
    killed, stored_at_kill = mid[0]
    st.start_worker("w2", queues="cpu,gpu")
    st.start_worker("w3", queues="gpu")
    done = c.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", (done["error"], st.log("w2")[-3000:], st.log("w3")[-3000:])
    res = done["result"]
    assert len(res["shards"]) == 6 and [sh["items"] for sh in res["shards"]] == [40] * 6
    pids = {sh["worker"].split(":")[1] for sh in res["shards"]}  # lease owner host:pid:nonce
    assert len(pids) >= 2, res["shards"]  # more than one worker took shards
    (redone,) = [sh for sh in res["shards"] if sh["job_id"] == killed]
    assert redone["attempts"] == 2 and redone["classified"] == 40
    assert all(sh["attempts"] == 1 for sh in res["shards"] if sh["job_id"] != killed)
    assert 0 < stored_at_kill <= res["skipped_done"] < 40  # only the killed shard's unsaved items were redone
    assert (res["total"], res["classified"], res["n_gold"]) == (n, n, n)
    assert sum(res["counts"].values()) == n and done["progress"] == 1.0
    ids = [p["item_id"] for p in c.iter_predictions(job["id"], page=1000)]
    assert sorted(ids) == sorted(f"n{i}" for i in range(n)) and len(ids) == n  # one listing, none missing
    shard_ids = ",".join(str(sh["job_id"]) for sh in res["shards"])
    with eng.connect() as conn:  # every item stored once, under the shard that classified it
        rows = conn.execute(text(f"SELECT count(*), count(DISTINCT item_id) FROM predictions "
                                 f"WHERE job_id IN ({shard_ids}, {job['id']})")).one()
    eng.dispose()
    assert tuple(rows) == (n, n)
