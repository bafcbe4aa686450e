"""Judging many items: each item asked with retries and exponential backoff, its answer parsed by the
rubric, and every failure counted. A response that could not be scored is kept as an "unscored" `JudgeRow`
with its reason, and a scale the judge did not score stays None (never filled in from another scale).
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Mapping, Sequence, TypeVar

from core.context import JobCancelled, JobContext
from core.contracts.judge import JudgeRow, JudgeSummary
from core.specs.judge import JudgeSpec
from workers.judge.backends.base import Judge
from workers.judge.errors import JudgeError, JudgeFatal, JudgeUnavailable, Unscorable
from workers.judge.rubrics import TWO_SCORE, Judgement, Rubric
from workers.judge.summary import summarize_judgements, validity_line

RAW_KEEP_CHARS = 2000  # the judge's raw answer kept on each row
MAX_BACKOFF_S = 30.0  # the longest wait between two attempts, however many retries
REQUIRED_ITEM_KEYS = ("item_id", "instruction", "response")

T = TypeVar("T")


def sample_items(items: Sequence[Mapping[str, Any]], n: int | None, seed: int) -> list[Mapping[str, Any]]:
    """At most n items, chosen by seed from the sorted ids (so two runs over the same ids pick the same
    ones), in their original order."""
    if n is None or len(items) <= n:
        return list(items)
    ids = sorted(str(it["item_id"]) for it in items)
    chosen = set(random.Random(seed).sample(ids, n))
    return [it for it in items if str(it["item_id"]) in chosen]


def _check_items(items: Sequence[Mapping[str, Any]]) -> None:
    seen: set[str] = set()
    for i, it in enumerate(items):
        missing = [k for k in REQUIRED_ITEM_KEYS if k not in it]
        if missing:
            raise ValueError(f"judge item {i} lacks {', '.join(missing)}: each item needs item_id, instruction, "
                             f"input, reference and response")
        iid = str(it["item_id"])
        if iid in seen:
            raise ValueError(f"judge item id {iid!r} appears twice")
        seen.add(iid)


def _new_row(item: Mapping[str, Any], judge: Judge, digest: str | None, rubric: Rubric, scoring: str) -> JudgeRow:
    return JudgeRow(item_id=str(item["item_id"]), judge_backend=judge.backend, judge_model=judge.model,
                    judge_digest=digest, rubric=rubric.name, rubric_version=rubric.version, rubric_sha=rubric.sha,
                    scoring=scoring, control=item.get("control"), pair_id=item.get("pair_id"),
                    repeat=int(item.get("repeat") or 0))


def _record(row: JudgeRow, verdict: Judgement, rubric: Rubric, done_reason: str | None = None) -> JudgeRow:
    """Put a verdict's scales on the row: scored, partial (some scales missing, named) or unscored."""
    for scale in rubric.scales:
        setattr(row, scale, verdict.scores.get(scale))
    missing = [s for s in rubric.scales if verdict.scores.get(s) is None]
    row.reason, row.parse, row.spread, row.score_mass = verdict.reason or None, verdict.method, verdict.spread, \
        verdict.score_mass
    if not missing:
        row.status = "scored"
    elif len(missing) < len(rubric.scales):
        row.status, row.error_kind = "partial", "truncated" if done_reason == "length" else "missing_scale"
        row.error = f"the judge did not score {', '.join(missing)}; left unscored, not filled in from another scale"
    else:
        row.status = "unscored"
    return row


def _judge_one(item: Mapping[str, Any], judge: Judge, digest: str | None, spec: JudgeSpec,
               stop: threading.Event) -> JudgeRow:
    """One row: ask with retries, parse, and record whatever happened."""
    rubric = getattr(judge, "rubric", TWO_SCORE)
    row = _new_row(item, judge, digest, rubric, "text")
    if rubric.empty_response_score is not None and not str(item.get("response") or "").strip():
        return _record(row, Judgement({s: rubric.empty_response_score for s in rubric.scales}, "empty response",
                                      "empty_response"), rubric)
    messages = rubric.messages(item)
    answer = None
    for attempt in range(spec.retries + 1):
        row.attempts = attempt + 1
        t0 = time.perf_counter()
        try:
            answer = judge.ask(messages)
            row.latency_ms = round((time.perf_counter() - t0) * 1000, 1)
            break
        except JudgeFatal:
            raise
        except JudgeUnavailable as e:
            row.latency_ms = round((time.perf_counter() - t0) * 1000, 1)
            row.error, row.error_kind = f"{e} (after {attempt + 1} attempts)", e.kind
            if attempt == spec.retries or stop.wait(min(MAX_BACKOFF_S, spec.backoff_s * 2 ** attempt)):
                return row
        except JudgeError as e:
            row.latency_ms = round((time.perf_counter() - t0) * 1000, 1)
            row.error, row.error_kind = str(e), e.kind
            return row
        except Exception as e:  # noqa: BLE001 - a backend failure (e.g. out of memory) costs this item only
            row.latency_ms = round((time.perf_counter() - t0) * 1000, 1)
            row.error, row.error_kind = f"{type(e).__name__}: {e}", "judge_error"
            return row
    assert answer is not None
    row.error = row.error_kind = None
    row.raw = answer.content[:RAW_KEEP_CHARS]
    row.thinking_chars = len(answer.thinking or "")
    try:
        verdict = rubric.parse(answer.content, answer.thinking)
    except Unscorable as e:
        if answer.done_reason == "length":
            row.error, row.error_kind = (f"the answer was cut off at the token limit (done_reason 'length'): raise "
                                         f"max_new_tokens or num_ctx ({e})"), "truncated"
        else:
            row.error, row.error_kind = str(e), e.kind
        return row
    return _record(row, verdict, rubric, answer.done_reason)


def _judge_by_probability(chosen: Sequence[Mapping[str, Any]], judge: Judge, digest: str | None, spec: JudgeSpec,
                          ctx: JobContext, rows: dict[str, JudgeRow]) -> None:
    """Probability scoring, batch by batch in this thread (the model is the only worker there is)."""
    rubric = judge.rubric
    if rubric.empty_response_score is not None:  # the rubric scores an empty response without asking
        empty = [it for it in chosen if not str(it.get("response") or "").strip()]
        for it in empty:
            row = _record(_new_row(it, judge, digest, rubric, "probability"), Judgement(
                {s: rubric.empty_response_score for s in rubric.scales}, "empty response", "empty_response"), rubric)
            rows[row.item_id] = row
        if empty:
            ctx.save_judge_rows([rows[str(it["item_id"])] for it in empty])
        chosen = [it for it in chosen if str(it.get("response") or "").strip()]
    total = len(rows) + len(chosen)
    # Batches of items of similar length waste little on padding (rows are put back in item order later).
    size = lambda it: sum(len(str(it.get(k) or "")) for k in ("instruction", "input", "reference", "response"))  # noqa: E731
    chosen = sorted(chosen, key=size)
    for start in range(0, len(chosen), spec.batch_size):
        ctx.check_cancel()
        batch = chosen[start:start + spec.batch_size]
        t0 = time.perf_counter()
        verdicts = judge.score_batch(batch)  # type: ignore[attr-defined]
        per_item = round((time.perf_counter() - t0) * 1000 / len(batch), 1)
        done = []
        for it, v in zip(batch, verdicts):
            row = _record(_new_row(it, judge, digest, rubric, "probability"), v, rubric)
            row.latency_ms, row.attempts = per_item, 1
            done.append(row)
            rows[row.item_id] = row
        ctx.save_judge_rows(done)
        ctx.progress(len(rows), total, scored=len(rows), unscored=0)


def judge_items(items: Sequence[Mapping[str, Any]], judge: Judge, spec: JudgeSpec, ctx: JobContext, *,
                controls: Sequence[Mapping[str, Any]] = ()) -> tuple[list[JudgeRow], JudgeSummary]:
    """Judge responses: one row per item (scored, partial or unscored, never dropped) and their summary.

    Args:
        items: dicts with item_id, instruction, input, reference and response.
        judge: an OllamaJudge, OpenAIJudge, LocalJudge or anything with the Judge protocol.
        spec: sample (at most this many items, chosen by seed), concurrency, retries, backoff_s, batch_size.
        ctx: receives events, progress and the rows (`save_judge_rows`, as they complete; re-saving overwrites).
        controls: the validity check's items (`control_items`), judged beside the sample, never sampled.

    Returns:
        (rows in item order, then the control rows; summarize_judgements(rows)).

    Raises:
        JudgeFatal: nothing can be judged (e.g. JudgeModelMissing: says which `ollama pull` to run).
        JudgeUnavailable: the server could not be reached before any item was judged.
        JobCancelled: the job was cancelled; rows finished so far are saved.
        ValueError: malformed items.
    """
    chosen = sample_items(items, spec.sample, spec.seed) + list(controls)
    _check_items(chosen)
    digest = _with_retries(judge.digest, spec)
    rubric = getattr(judge, "rubric", TWO_SCORE)
    by_probability = getattr(judge, "scoring", "text") == "probability"
    workers = 1 if by_probability else min(spec.concurrency, getattr(judge, "max_concurrency", None)
                                           or spec.concurrency)
    ctx.event(f"judging {len(chosen) - len(controls)} of {len(items)} items and {len(controls)} control items with "
              f"{judge.backend} judge {judge.model} ({rubric.name} rubric, "
              f"{'probability' if by_probability else 'text'} scoring)",
              metrics={"digest": digest, "rubric_version": rubric.version, "concurrency": workers})
    rows: dict[str, JudgeRow] = {}
    if by_probability:
        _judge_by_probability(chosen, judge, digest, spec, ctx, rows)
    else:
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        try:
            pending: set[Future] = {pool.submit(_judge_one, it, judge, digest, spec, stop) for it in chosen}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                ctx.check_cancel()
                finished = [f.result() for f in done]  # re-raises JudgeFatal
                if finished:
                    for r in finished:
                        rows[r.item_id] = r
                    ctx.save_judge_rows(finished)
                    n_unscored = sum(r.status != "scored" for r in rows.values())
                    ctx.progress(len(rows), len(chosen), scored=len(rows) - n_unscored, unscored=n_unscored)
        except (JobCancelled, JudgeFatal, KeyboardInterrupt):
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
    ordered = [rows[str(it["item_id"])] for it in chosen]
    summary = summarize_judgements(ordered)
    if summary.n_unscored or summary.n_partial:
        ctx.event(f"the judge could not fully score {summary.n_unscored + summary.n_partial} of {summary.n} "
                  f"responses", level="warning", metrics={"reasons": summary.unscored_reasons})
    if controls:
        ctx.event(validity_line(summary.validity), level="info" if summary.evidence else "warning")
    return ordered, summary


def _with_retries(fn: Callable[[], T], spec: JudgeSpec) -> T:
    for attempt in range(spec.retries + 1):
        try:
            return fn()
        except JudgeUnavailable:
            if attempt == spec.retries:
                raise
            time.sleep(min(MAX_BACKOFF_S, spec.backoff_s * 2 ** attempt))
