"""The judge's validity check: a control set built from the task itself, and whether the judge tells its
correct answers from its wrong ones better than chance (and agrees with itself on repeated items).

For the same article the gold label's answer and a wrong label's; for a general instruction its reference
answer and another item's. A judge that does not beat chance here is flagged, and its scores are labelled
as not evidence.
"""
from __future__ import annotations

import random
import statistics
from typing import Any, Mapping, Sequence

from core.contracts.judge import JudgeValidity, SelfAgreement
from core.stats import wilson_interval

AGREE_POINTS = 5.0  # two scores of the same item within this many points agree
CORRECT_KINDS = ("gold", "real")  # the control kinds that are a pair's correct answer
CHANCE = 0.5  # a judge that cannot tell a pair's answers apart prefers the correct one half the time


def control_items(items: Sequence[Mapping[str, Any]], *, label_names: Sequence[str] | None = None,
                  n_pairs: int = 20, n_repeats: int = 5, seed: int = 0,
                  pool: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Correct and wrong answers to the same task, for the judge to tell apart.

    With `label_names` (classification): for each of up to `n_pairs` items whose reference is a label, the
    gold label as the answer ("gold") and another label chosen by seed ("wrong"). Without (general
    instructions): each item's reference answer ("real") and another item's reference ("shuffled"), drawn
    from `pool` (default: the items). The first `n_repeats` pairs are added a second time (`repeat` 1) to
    measure the judge's self-agreement.

    Returns:
        judge items with control, pair_id and repeat set; ids "control/<item>/<kind>[#2]".
    """
    rng = random.Random(seed)
    usable = [it for it in items if str(it.get("reference") or "").strip()
              and (label_names is None or it["reference"] in label_names)]
    if label_names is not None and len(set(label_names)) < 2:
        return []
    refs = [str(it["reference"]) for it in (pool if pool is not None else usable)
            if str(it.get("reference") or "").strip()]
    if label_names is None and len(set(refs)) < 2:
        return []
    picked = sorted(usable, key=lambda it: str(it["item_id"]))
    rng.shuffle(picked)
    picked = picked[:n_pairs]
    pairs = []
    for it in picked:
        iid, ref = str(it["item_id"]), str(it["reference"])
        if label_names is not None:
            correct, wrong = ("gold", ref), ("wrong", rng.choice([n for n in label_names if n != ref]))
        else:
            others = [r for r in refs if r != ref]
            if not others:
                continue
            correct, wrong = ("real", ref), ("shuffled", rng.choice(others))
        base = {"instruction": it["instruction"], "input": it.get("input", ""), "reference": ref, "pair_id": iid}
        pairs.append([{**base, "item_id": f"control/{iid}/{kind}", "control": kind, "response": answer, "repeat": 0}
                      for kind, answer in (correct, wrong)])
    out = [row for pair in pairs for row in pair]
    for pair in pairs[:n_repeats]:
        out += [{**row, "item_id": row["item_id"] + "#2", "repeat": 1} for row in pair]
    return out


def _value(row: Mapping[str, Any], scale: str) -> float | None:
    v = row.get(scale)
    return None if v is None else float(v)


def judge_validity(rows: Sequence[Mapping[str, Any]], scale: str) -> JudgeValidity:
    """How often the judge prefers the correct answer of a control pair, and whether that beats chance.

    A pair counts for the judge only when it scored the correct answer strictly higher on `scale`; a tie
    or an unscored answer counts against it, so a judge that scores nothing cannot pass. Chance is 1/2; the
    judge beats it when the Wilson 95% interval's lower end is above 1/2.

    Returns:
        the counts, the rate with its Wilson interval, and the self-agreement on repeated items (None
        without repeats).
    """
    ctl = [r for r in rows if r.get("control")]
    first = {(r["pair_id"], r["control"]): r for r in ctl if not r.get("repeat")}
    pairs: dict[str, dict[str, Mapping[str, Any]]] = {}
    for (pid, kind), r in first.items():
        pairs.setdefault(pid, {})["correct" if kind in CORRECT_KINDS else "wrong"] = r
    k = ties = unscored = 0
    n = 0
    for pair in pairs.values():
        if "correct" not in pair or "wrong" not in pair:
            continue
        n += 1
        a, b = _value(pair["correct"], scale), _value(pair["wrong"], scale)
        if a is None or b is None:
            unscored += 1
        elif a > b:
            k += 1
        elif a == b:
            ties += 1
    ci = wilson_interval(k, n)
    agree = None
    repeats = [r for r in ctl if r.get("repeat")]
    if repeats:
        diffs, n_rep = [], 0
        for r in repeats:
            orig = first.get((r["pair_id"], r["control"]))
            if orig is None:
                continue
            n_rep += 1
            a, b = _value(orig, scale), _value(r, scale)
            diffs.append(None if a is None or b is None else abs(a - b))
        k_within = sum(d is not None and d <= AGREE_POINTS for d in diffs)
        known = [d for d in diffs if d is not None]
        agree = SelfAgreement(n=n_rep, k_within=k_within, within_points=AGREE_POINTS,
                              rate=k_within / n_rep if n_rep else None,
                              ci=list(wilson_interval(k_within, n_rep)) if n_rep else None,
                              mean_abs_diff=statistics.fmean(known) if known else None)
    return JudgeValidity(scale=scale, n_pairs=n, k_correct=k, n_ties=ties, n_unscored_pairs=unscored,
                         rate=k / n if n else None, ci=list(ci) if ci else None, chance=CHANCE,
                         beats_chance=bool(ci and ci[0] > CHANCE), self_agreement=agree)

