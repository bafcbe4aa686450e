"""What a judge run's rows add up to (`JudgeSummary`), the paired change between two runs, and the
sentences that say what the control set showed (the one place they are written)."""
from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from core.contracts.judge import JudgeRow, JudgeSummary, JudgeValidity, LatencySummary, UnscoredExample
from core.formatting import pct
from core.stats import mean_ci
from workers.judge.controls import judge_validity
from workers.judge.rubrics import RUBRIC_VERSION, RUBRICS, TWO_SCORE

HISTOGRAM_EDGES = list(range(0, 101, 10))
N_UNSCORED_EXAMPLES = 5


def _as_dict(r: JudgeRow | Mapping[str, Any]) -> Mapping[str, Any]:
    """A row as a mapping: JudgeRow, the store's column dict (with `extra`), or a plain dict."""
    if isinstance(r, JudgeRow):
        return r.model_dump()
    if r.get("extra"):
        return {**r, **r["extra"]}
    return r


def _scales_of(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    name = next((r.get("rubric") for r in rows if r.get("rubric")), None)
    return RUBRICS[name].scales if name in RUBRICS else TWO_SCORE.scales


def summarize_judgements(rows: Sequence[JudgeRow | Mapping[str, Any]], *, bootstrap: int = 1000,
                         seed: int = 0) -> JudgeSummary:
    """Means (with bootstrap 95% CIs) per scale over the rows that scored it, the unscored count and
    reasons beside them, and the judge's validity on its control rows (summarised apart).

    A scale no row scored is None; the primary scale of the rubric is the one the validity check compares.
    """
    all_rows = [_as_dict(r) for r in rows]
    items = [r for r in all_rows if not r.get("control")]
    controls = [r for r in all_rows if r.get("control")]
    scales = _scales_of(all_rows)
    primary = RUBRICS[items[0]["rubric"]].primary if items and items[0].get("rubric") in RUBRICS else \
        ("score" if scales == ("score",) else "following")
    lat = [float(r["latency_ms"]) for r in items if r.get("latency_ms") is not None]
    first = items[0] if items else (controls[0] if controls else {})
    unscored = [r for r in items if r.get("status") != "scored"]
    per_scale, scores, histogram = {}, {}, {"edges": HISTOGRAM_EDGES}
    for k, scale in enumerate(scales):
        vals = np.array([float(r[scale]) for r in items if r.get(scale) is not None], dtype=np.float64)
        per_scale[scale] = mean_ci(vals, bootstrap, seed + k)
        scores[scale] = vals.tolist()
        histogram[scale] = np.histogram(vals, bins=HISTOGRAM_EDGES)[0].astype(int).tolist()
    spreads = [r["spread"] for r in items if r.get("spread")]
    validity = judge_validity(controls, primary) if controls else None
    return JudgeSummary(
        n=len(items),
        n_scored=sum(r.get("status") == "scored" for r in items),
        n_partial=sum(r.get("status") == "partial" for r in items),
        n_unscored=sum(r.get("status") not in ("scored", "partial") for r in items),
        unscored_reasons=dict(Counter(str(r.get("error_kind") or "unknown") for r in unscored)),
        unscored_examples=[UnscoredExample(item_id=r.get("item_id"), error=r.get("error"))
                           for r in unscored[:N_UNSCORED_EXAMPLES]],
        scales=list(scales), **per_scale, scores=scores, histogram=histogram,
        spread={s: statistics.fmean(sp[s] for sp in spreads if s in sp) for s in scales
                if any(s in sp for sp in spreads)} if spreads else None,
        validity=validity,
        evidence=bool(validity and validity.beats_chance),
        rubric=first.get("rubric") or TWO_SCORE.name,
        scoring=first.get("scoring"),
        backend=first.get("judge_backend") or first.get("backend"),
        judge_model=first.get("judge_model"),
        model_digest=first.get("judge_digest") or first.get("model_digest"),
        rubric_version=first.get("rubric_version", RUBRIC_VERSION),
        latency_ms=LatencySummary(mean=statistics.fmean(lat), p50=statistics.median(lat), max=max(lat))
        if lat else None,
    )


def compare_judgements(rows_a: Sequence[JudgeRow | Mapping[str, Any]], rows_b: Sequence[JudgeRow | Mapping[str, Any]],
                       *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired change in judge scores (b - a) per scale, on items both runs scored on that scale (controls
    left out), with bootstrap 95% CIs.

    Returns:
        {n_paired, n_unpaired, <scale> {mean, ci, std, n} | None for each scale}.
    """
    a = {str(r["item_id"]): r for r in map(_as_dict, rows_a) if not r.get("control")}
    b = {str(r["item_id"]): r for r in map(_as_dict, rows_b) if not r.get("control")}
    scales = _scales_of(list(a.values()) + list(b.values()))
    shared = [i for i in a if i in b and a[i].get("status") == "scored" and b[i].get("status") == "scored"]
    out: dict[str, Any] = {"n_paired": len(shared), "n_unpaired": len(set(a) | set(b)) - len(shared)}
    for scale in scales:
        both = [i for i in a if i in b and a[i].get(scale) is not None and b[i].get(scale) is not None]
        d = np.array([float(b[i][scale]) - float(a[i][scale]) for i in both], dtype=np.float64)
        out[scale] = mean_ci(d, bootstrap, seed)
    return out


# --------------------------------------------------------------------------------------------------
# What the control set showed, in words


def validity_sentence(v: JudgeValidity | None) -> str:
    """What the control set showed, as a clause: the pairs the judge got right, its self-agreement, and
    whether its scores are evidence."""
    if v is None or not v.n_pairs:
        return "no control pairs were scored, so the judge's scores are not evidence"
    s = (f"prefers the correct answer in {v.k_correct} of {v.n_pairs} control pairs "
         f"({pct(v.rate, v.ci, digits=0)}, chance {pct(v.chance, digits=0)}; ties {v.n_ties}, "
         f"unscored {v.n_unscored_pairs}) on {v.scale}")
    a = v.self_agreement
    if a and a.n:
        s += f"; agrees with itself (within {a.within_points:.0f} points) on {a.k_within} of {a.n} repeated items"
    s += "; beats chance" if v.beats_chance else "; does NOT beat chance: its scores are not evidence"
    return s


def validity_line(v: JudgeValidity | None) -> str:
    """One sentence for the job's events and the summary: what the control set showed."""
    return f"judge validity: {validity_sentence(v)}"


def validity_cell(v: JudgeValidity | None) -> str:
    """The same, short, for a table cell: '12 of 12, 100.0% [75.8, 100.0]; self-agreement 3 of 3'."""
    if v is None or not v.n_pairs:
        return "no control set: not evidence"
    cell = f"{v.k_correct} of {v.n_pairs}, {pct(v.rate, v.ci)}"
    a = v.self_agreement
    if a and a.n:
        cell += f"; self-agreement {a.k_within} of {a.n}"
    return cell + ("" if v.beats_chance else "; NOT above chance: not evidence")


def not_evidence_reason(v: JudgeValidity | None) -> str:
    """Why a judge run's scores are not evidence, as a clause ('did not beat chance on ... (3 of 12)')."""
    if v is None or not v.n_pairs:
        return "scored no control pairs"
    return f"did not beat chance on its control set ({v.k_correct} of {v.n_pairs})"
