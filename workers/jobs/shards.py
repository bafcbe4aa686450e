"""Sharded classify jobs: one big batch split into shard child jobs that any number of gpu workers take.

A classify job whose input holds more than `classify_shard_size` items (core/settings.py) does not
classify them itself: `split` creates one child classify job per shard (the parent's spec plus a
`shard` range; inline items are sliced into the child), commits them, enqueues them on the `gpu`
queue and raises `ShardsPending`. The parent stays `running`; each child stores its predictions under
its own job id, rolls its progress up into the parent's (one progress bar, and the parent's lease kept
alive while shards run) and, when it ends, notifies the parent (`advance`), which records one result
over all shards once every shard has ended: succeeded, or failed/cancelled with the shard that caused it.

Cancelling the parent cancels its shards (db/jobs.request_cancel cascades); a worker killed mid-shard
costs only that shard's unsaved items (the shard is an ordinary classify job: re-delivered, it skips
what it stored). The parent's prediction listing covers its shards (db/results.prediction_job_ids).
"""
from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import broker.app  # called as broker.app.enqueue...: one name for tests to stub
from core.context import JobCancelled
from core.contracts.results import ClassifyResult
from core.settings import get_settings
from core.specs.classify import ClassifySpec
from core.version import code_version
from db import jobs as jobq
from db import results as resq
from db.models import TERMINAL, Job, utcnow
from db.session import session_scope


class ShardsPending(Exception):
    """The job's items went to shard child jobs: leave the parent running; its shards finish it."""


def shard_ranges(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: as many shards as `shard_size` needs, of near-equal sizes."""
    count = max(1, math.ceil(n_items / shard_size))
    return [(i * n_items // count, (i + 1) * n_items // count) for i in range(count)]


def _key(parent_id: int, index: int) -> str:
    return f"classify:{parent_id}:shard:{index}"


def split(job_id: int, spec: ClassifySpec, n_items: int, *, shard_size: int | None = None) -> None:
    """Hand a big classify job's items to shard children, or return (doing nothing) for a small one.

    Idempotent: a re-run of the parent (its worker died) creates no second child for a shard and
    re-sends only the shards still queued.

    Raises:
        ShardsPending: the items went to shard jobs (always, when there are more than `shard_size`).
        JobCancelled: the job was cancelled (or had ended) before its shards were made: none are made or sent.
    """
    size = shard_size or get_settings().classify_shard_size
    if spec.shard is not None or n_items <= size:
        return
    ranges = shard_ranges(n_items, size)
    base = spec.model_dump(mode="json", exclude={"shard"})
    to_send: list[int] = []
    with session_scope() as s:
        # Under the job's row lock: a re-run of the parent (the broker was down sending its shards) that a cancel
        # overtook made no shard and wrote "split into N shards" after its end (found by the soak, issue #27).
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL or job.cancel_requested:
            raise JobCancelled(f"job {job_id} was cancelled before its shards were sent")
        for index, (start, stop) in enumerate(ranges):
            child = jobq.find_by_idempotency_key(_key(job_id, index), session=s)
            if child is None:
                child_spec = {**base, "shard": {"index": index, "count": len(ranges), "start": start, "stop": stop}}
                if spec.items is not None:  # the child carries its slice only
                    child_spec.update(items=base["items"][start:stop], limit=None)
                child = jobq.create_job(session=s, kind="classify", queue="gpu", spec=child_spec, parent_id=job_id,
                                        idempotency_key=_key(job_id, index), code_version=code_version())
            if child.status == "queued":
                to_send.append(child.id)
        jobq.add_event(job_id, f"split into {len(ranges)} shards", session=s,
                       metrics={"shards": len(ranges), "items": n_items, "shard_size": size})
    for child_id in to_send:
        broker.app.enqueue(child_id, "classify", "gpu")
    raise ShardsPending(f"job {job_id}: {n_items} items in {len(ranges)} shards")


def is_shard(job: Job) -> bool:
    return job.kind == "classify" and job.parent_id is not None and (job.spec or {}).get("shard") is not None


def roll_up(parent_id: int, *, session: Any) -> None:
    """The parent's progress from its shards' (done items / all items), and its lease renewed."""
    parent = session.get(Job, parent_id)
    if parent is None or parent.status in TERMINAL:
        return
    kids = jobq.children(parent_id, session=session)
    total = sum(_size(k) for k in kids)
    done = sum(_size(k) * (1.0 if k.status == "succeeded" else float(k.progress or 0.0)) for k in kids)
    elapsed = max((utcnow() - (parent.started_at or utcnow())).total_seconds(), 1e-9)
    info = {"done": int(done), "total": total, "message": "classified",
            "shards": len(kids), "shards_done": sum(k.status in TERMINAL for k in kids),
            "items_per_s": round(done / elapsed, 3)}
    jobq.set_progress(parent_id, min(1.0, done / total) if total else 0.0, info, session=session)
    parent.lease_expires_at = utcnow() + timedelta(seconds=get_settings().lease_s)


def _size(job: Job) -> int:
    shard = (job.spec or {}).get("shard") or {}
    return int(shard.get("stop", 0)) - int(shard.get("start", 0))


def advance(job_id: int) -> str | None:
    """Look at a sharded parent's shards; finish it once all have ended (then tell its own parent, a
    pipeline, if any). Returns its status afterwards, or None when the job is not a sharded classify job
    (then it is someone else's to advance)."""
    status, parent_id = _advance(job_id)
    if status in TERMINAL and parent_id is not None:
        broker.app.enqueue_advance(parent_id)
    return status


def _advance(job_id: int) -> tuple[str | None, int | None]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.kind != "classify":
            return None, None
        kids = [k for k in jobq.children(job_id, session=s) if is_shard(k)]
        if not kids:
            return None, None
        if job.status in TERMINAL:
            return job.status, None  # told its parent when it ended
        roll_up(job_id, session=s)
        if not all(k.status in TERMINAL for k in kids):
            failed = next((k for k in kids if k.status == "failed"), None)
            if failed is None or job.cancel_requested:
                return job.status, None
            # One failed shard fails the job: stop the others (they report back when stopped).
            jobq.request_cancel(job_id, session=s)
            jobq.add_event(job_id, f"shard {_index(failed)} (job {failed.id}) failed: stopping the other shards",
                           session=s, level="error")
            return job.status, None
        failed = next((k for k in kids if k.status == "failed"), None)
        cancelled = next((k for k in kids if k.status == "cancelled"), None)
        if failed is not None:
            jobq.finish(job_id, "failed", session=s, error=f"shard {_index(failed)} (job {failed.id}) failed: "
                                                           f"{failed.error}")
            return "failed", job.parent_id
        if cancelled is not None or job.cancel_requested:
            jobq.finish(job_id, "cancelled", session=s)
            return "cancelled", job.parent_id
        result = merge_results(job, kids, parent_rows=resq.prediction_rows(job_id, session=s, shards=False))
        jobq.finish(job_id, "succeeded", session=s, result=result.model_dump(mode="json"))
        return "succeeded", job.parent_id


def _index(job: Job) -> int:
    return int(((job.spec or {}).get("shard") or {}).get("index", -1))


def merge_results(parent: Job, kids: list[Job], *, parent_rows: list) -> ClassifyResult:
    """One ClassifyResult over all shards (each shard's result covers all of its stored items)."""
    parts = [ClassifyResult.model_validate(k.result) for k in sorted(kids, key=_index)]
    first = parts[0]
    classified = sum(p.classified for p in parts)
    n_gold = sum(p.n_gold or 0 for p in parts)
    correct = sum((p.accuracy or 0.0) * (p.n_gold or 0) for p in parts)
    counts: dict[str, int] = {name: 0 for name in first.label_names}
    for p in parts:
        for name, n in p.counts.items():
            counts[name] = counts.get(name, 0) + n
    end = max(k.finished_at or utcnow() for k in kids)
    seconds = (end - (parent.started_at or end)).total_seconds()  # the parent's wall time, all shards together
    following = [(p.following_rate, p.classified) for p in parts if p.following_rate is not None]
    return ClassifyResult(
        mode=first.mode, model=first.model, adapter_id=first.adapter_id, dataset_id=first.dataset_id,
        label_names=first.label_names, template=first.template, instruction=first.instruction,
        total=sum(p.total for p in parts), classified=classified,
        skipped_done=sum(p.skipped_done for p in parts), attempt_classified=sum(p.attempt_classified for p in parts),
        seconds=round(seconds, 3), items_per_s=round(classified / seconds, 3) if seconds > 0 else None,
        n_failed=sum(p.n_failed for p in parts), failed=[f for p in parts for f in p.failed],
        truncated=sum(p.truncated for p in parts),
        rejected=sum("rejected" in r.flags for r in parent_rows), counts=counts,
        n_gold=n_gold or None, accuracy=correct / n_gold if n_gold else None,
        following_rate=(sum(r * n for r, n in following) / sum(n for _, n in following)) if following and
        sum(n for _, n in following) else None,
        shards=[{"index": _index(k), "job_id": k.id, "items": _size(k), "classified": p.classified,
                 "attempts": k.attempts, "worker": k.lease_owner,
                 "items_per_s": p.items_per_s} for k, p in zip(sorted(kids, key=_index), parts)])
