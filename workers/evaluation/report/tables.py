"""The report's tables (summary and per class), as rows of strings for the HTML page and the terminal.

They read only the evaluation document (`workers.evaluation.evaluate.evaluate_runs`, plain JSON, or one
stored by older code), so a report can be re-rendered later from the stored result; the judge summaries
in it are read through their contract (`JudgeSummary`).
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from core.contracts.judge import DEFAULT_SCALES, JudgeSummary
from core.formatting import MISSING, num, p_value, pct
from workers.judge import validity_cell, validity_sentence


# --------------------------------------------------------------------------------------------------
# Reading the evaluation document


def model_names(ev: Mapping[str, Any]) -> list[str]:
    """The evaluated models, the base first."""
    return list(ev.get("models") or {})


def judge_summaries(ev: Mapping[str, Any], block: str) -> dict[str, JudgeSummary]:
    """The judge summaries of one block ("judge" or "dialogue") by model name, read through their contract
    (a summary stored before a field existed loads with that field at its default).

    Raises:
        ContractError: a summary does not match `JudgeSummary`.
    """
    return {name: s if isinstance(s, JudgeSummary) else
            JudgeSummary.validated(s, where=f"the evaluation's {block} summary of {name!r}")
            for name, s in (ev.get(block) or {}).items()}


def _following(ev: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    gen = (ev.get("generate") or {}).get(name) or {}
    return gen.get("instruction_following") or ((ev.get("models") or {}).get(name) or {}).get("instruction_following")


_SCALE_TITLES = {"coherence": "coherence", "following": "instruction following", "score": "score"}


def _judge_rows(ev: Mapping[str, Any], block: str, label: str, names: Sequence[str],
                others: Sequence[str]) -> list[list[str]]:
    """Summary rows for a block of judge summaries ("judge" or "dialogue") and its "<block>_comparisons":
    first the judge's validity on its control set, then a row per scale, labelled "not evidence" where the
    judge did not beat chance on its control."""
    summaries, cmps = judge_summaries(ev, block), ev.get(f"{block}_comparisons") or {}
    if not summaries:
        return []
    rows = [[f"{label}: validity, prefers the correct answer (95% CI)"]
            + [_validity_cell(summaries.get(n)) for n in names] + ["" for _ in others]]
    scales = next((s.scales for s in summaries.values() if s.scales), DEFAULT_SCALES)
    for key in scales:
        row = [f"{label}: {_SCALE_TITLES.get(key, key)} 0-100 (95% CI)"]
        for n in names:
            s = summaries.get(n)
            if s is None:
                row.append(MISSING)
                continue
            m = s.scale(key)
            scored = m.n if m else 0
            row.append(f"{num(m.mean, m.ci) if m else MISSING} (scored {scored}, unscored {s.n - scored})"
                       + ("; not evidence" if s.not_evidence else ""))
        for n in others:
            d = (cmps.get(n) or {}).get(key)
            row.append(f"{num(d['mean'], d.get('ci'), signed=True)} (paired n={d['n']})" if d else MISSING)
        rows.append(row)
    return rows


def _validity_cell(s: JudgeSummary | None) -> str:
    return validity_cell(s.validity) if s else MISSING


def judge_validity_lines(ev: Mapping[str, Any]) -> list[str]:
    """One line per judge run: what its control set showed (`workers.judge.validity_sentence`)."""
    lines = []
    for block, title in (("judge", "judge"), ("dialogue", "general-instruction judge")):
        for name, s in judge_summaries(ev, block).items():
            lines.append(f"{title} of {name} ({s.backend} {s.judge_model}, {s.rubric or 'two-score'} rubric, "
                         f"{s.scoring or 'text'} scoring): {validity_sentence(s.validity)}")
    return lines


def _accuracy_change(c: Mapping[str, Any] | None) -> str:
    """A paired comparison's cell (`compare_models`): the accuracy change with its interval, and McNemar."""
    if not c:
        return MISSING
    return (f"{pct(c['difference']['value'], c['difference'].get('ci'), signed=True)}; McNemar "
            f"{p_value(c['mcnemar']['p_value'])} (b={c['b']}, c={c['c']})")


def summary_rows(ev: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary table: one row per metric, a column per model, then the change of
    each other model against the base (with its interval and test)."""
    names = model_names(ev)
    base = ev.get("base") or (names[0] if names else None)
    others = [n for n in names if n != base]
    header = ["metric"] + names + [f"{n} − {base}" for n in others]
    models, cmps = ev.get("models") or {}, ev.get("comparisons") or {}
    rows: list[list[str]] = []

    def point(name: str, key: str) -> float | None:
        m = models.get(name) or {}
        return ((m.get(key) or {}).get("value"))

    acc = ["accuracy (95% CI)"] + [pct(point(n, "accuracy"), models[n]["accuracy"].get("ci")) for n in names]
    acc += [_accuracy_change(cmps.get(n)) for n in others]
    rows.append(acc)

    f1 = ["macro-F1 (95% CI)"] + [pct(point(n, "macro_f1"), models[n]["macro_f1"].get("ci")) for n in names]
    for n in others:
        a, b = point(base, "macro_f1"), point(n, "macro_f1")
        f1.append(pct(b - a, signed=True) if a is not None and b is not None else MISSING)
    rows.append(f1)

    fol = ["instruction following (95% CI)"]
    for n in names:
        f = _following(ev, n)
        fol.append(f"{pct(f['value'], f.get('ci'))} (n={f['n']})" if f else MISSING)
    for n in others:
        fa, fb = _following(ev, base), _following(ev, n)
        fol.append(pct(fb["value"] - fa["value"], signed=True) if fa and fb else MISSING)
    rows.append(fol)

    ece = ["calibration error (ECE, 15 bins)"]
    for n in names:
        cal = models[n].get("calibration") or {}
        ece.append(f"{cal['ece']:.3f} (n={cal['n']})" if cal.get("ece") is not None else MISSING)
    for n in others:
        ea, eb = (models[base].get("calibration") or {}).get("ece"), (models[n].get("calibration") or {}).get("ece")
        ece.append(f"{eb - ea:+.3f}" if ea is not None and eb is not None else MISSING)
    rows.append(ece)

    failed = ["failed items (counted wrong)"] + [f"{models[n]['n_failed']} of {models[n]['n']}" for n in names]
    failed += ["" for _ in others]
    rows.append(failed)

    for block, label in (("judge", "judge"), ("dialogue", "general instructions, judge")):
        rows += _judge_rows(ev, block, label, names, others)
    _add_baseline_columns(ev, header, rows)
    return header, rows


def _add_baseline_columns(ev: Mapping[str, Any], header: list[str], rows: list[list[str]]) -> None:
    """The classical baseline's column beside the models', and each fine-tuned model's change against it
    (McNemar on the paired items) at the end. Rows it has no figure for get "–"."""
    bl = ev.get("baseline")
    if not bl:
        return
    names = model_names(ev)
    base = ev.get("base") or names[0]
    vs = [n for n in names if n != base] or names  # the fine-tuned models (the base alone if it is alone)
    m, cmps, bname = bl["metrics"], bl.get("comparisons") or {}, bl["name"]
    at = 1 + len(names)
    header.insert(at, bname)
    header += [f"{n} − {bname}" for n in vs]

    def f1_change(n: str) -> str:
        a, b = m["macro_f1"]["value"], ((ev["models"].get(n) or {}).get("macro_f1") or {}).get("value")
        return pct(b - a, signed=True) if a is not None and b is not None else MISSING

    cells = {"accuracy (95% CI)": (pct(m["accuracy"]["value"], m["accuracy"].get("ci")),
                                   lambda n: _accuracy_change(cmps.get(n))),
             "macro-F1 (95% CI)": (pct(m["macro_f1"]["value"], m["macro_f1"].get("ci")), f1_change),
             "failed items (counted wrong)": (f"{m['n_failed']} of {m['n']}", lambda n: "")}
    for r in rows:
        own, change = cells.get(r[0], (MISSING, lambda n: ""))
        r.insert(at, own)
        r += [change(n) for n in vs]


def per_class_rows(ev: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per class, support then precision / recall / F1 of each model."""
    names = model_names(ev)
    models = ev.get("models") or {}
    classes: list[str] = []
    for n in names:
        for lab in models[n]["per_class"]:
            if lab not in classes:
                classes.append(lab)
    header = ["class", "support"] + [f"{n} {k}" for n in names for k in ("P", "R", "F1")]
    rows = []
    for lab in classes:
        sup = next((models[n]["per_class"][lab]["support"] for n in names if lab in models[n]["per_class"]), 0)
        trained = all(models[n]["per_class"].get(lab, {}).get("trained", True) for n in names)
        row = [lab + ("" if trained else " (not trained)"), str(sup)]
        for n in names:
            pc = models[n]["per_class"].get(lab)
            row += [f"{pc[k]:.3f}" for k in ("precision", "recall", "f1")] if pc else [MISSING] * 3
        rows.append(row)
    bl = ev.get("baseline")
    if bl:  # the classical baseline's precision / recall / F1 after the models'
        header += [f"{bl['name']} {k}" for k in ("P", "R", "F1")]
        for lab, row in zip(classes, rows):
            pc = bl["metrics"]["per_class"].get(lab)
            row += [f"{pc[k]:.3f}" for k in ("precision", "recall", "f1")] if pc else [MISSING] * 3
    return header, rows


# --------------------------------------------------------------------------------------------------
# The terminal


def render_table(evaluation: Mapping[str, Any], *, width: int = 140) -> str:
    """The summary and per-class tables as plain text for a terminal."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    for title, (header, rows) in (("summary", summary_rows(evaluation)), ("per class", per_class_rows(evaluation))):
        table = Table(title=title, show_lines=False)
        for h in header:
            table.add_column(h, overflow="fold")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    bl = evaluation.get("baseline")
    if bl:
        console.print(f"baseline {bl['name']}: {bl['method']}, fitted on {bl['n_train']} texts in {bl['fit_s']:.1f} s, "
                      f"scored on {bl['n_items']} items", highlight=False)
    for line in judge_validity_lines(evaluation):
        console.print(line, highlight=False)
    for m in evaluation.get("missing") or []:
        console.print(f"note: {m}", highlight=False)
    return buf.getvalue()
