"""Reports: one self-contained HTML page (plots embedded as PNG data URIs) and a terminal table.

Both read only the evaluation document from `workers.evaluation.evaluate.evaluate_runs` (plain JSON), so a report
can be re-rendered later from the stored result. Plots use matplotlib's Agg canvas directly (no pyplot
global state, safe in a worker thread).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


# --------------------------------------------------------------------------------------------------
# Reading the evaluation document


def _models(ev: Mapping[str, Any]) -> list[str]:
    return list(ev.get("models") or {})


def _following(ev: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    gen = (ev.get("generate") or {}).get(name) or {}
    return gen.get("instruction_following") or ((ev.get("models") or {}).get(name) or {}).get("instruction_following")


def _pct(x: float | None, ci: Sequence[float] | None = None, *, signed: bool = False) -> str:
    """0.853, [0.82, 0.88] -> '85.3% [82.0, 88.0]'; signed: '+3.1 pts [...]'."""
    if x is None:
        return "–"
    s = f"{x * 100:+.1f} pts" if signed else f"{x * 100:.1f}%"
    if ci:
        s += f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"
    return s


def _num(x: float | None, ci: Sequence[float] | None = None, *, digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return "–"
    s = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    if ci:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


_SCALE_TITLES = {"coherence": "coherence", "following": "instruction following", "score": "score"}


def _judge_rows(ev: Mapping[str, Any], block: str, label: str, names: Sequence[str],
                others: Sequence[str]) -> list[list[str]]:
    """Summary rows for a block of judge summaries ("judge" or "dialogue") and its "<block>_comparisons":
    first the judge's validity on its control set, then a row per scale, labelled "not evidence" where the
    judge did not beat chance on its control."""
    summaries, cmps = ev.get(block) or {}, ev.get(f"{block}_comparisons") or {}
    if not summaries:
        return []
    rows = [[f"{label}: validity, prefers the correct answer (95% CI)"]
            + [_validity_cell(summaries.get(n)) for n in names] + ["" for _ in others]]
    scales = next((s["scales"] for s in summaries.values() if s.get("scales")), ["coherence", "following"])
    for key in scales:
        row = [f"{label}: {_SCALE_TITLES.get(key, key)} 0-100 (95% CI)"]
        for n in names:
            s = summaries.get(n)
            m = s.get(key) if s else None
            row.append(f"{_num(m['mean'], m.get('ci')) if m else '–'} (scored {m['n'] if m else 0}, "
                       f"unscored {s['n'] - (m['n'] if m else 0)})" + ("" if s.get("evidence", True) else
                                                                       "; not evidence") if s else "–")
        for n in others:
            d = (cmps.get(n) or {}).get(key)
            row.append(f"{_num(d['mean'], d.get('ci'), signed=True)} (paired n={d['n']})" if d else "–")
        rows.append(row)
    return rows


def _validity_cell(s: Mapping[str, Any] | None) -> str:
    if not s:
        return "–"
    v = s.get("validity")
    if not v or not v.get("n_pairs"):
        return "no control set: not evidence"
    cell = f"{v['k_correct']} of {v['n_pairs']}, {_pct(v['rate'], v['ci'])}"
    a = v.get("self_agreement")
    if a and a.get("n"):
        cell += f"; self-agreement {a['k_within']} of {a['n']}"
    return cell + ("" if v["beats_chance"] else "; NOT above chance: not evidence")


def judge_validity_lines(ev: Mapping[str, Any]) -> list[str]:
    """One line per judge run: what its control set showed (`workers.judge.validity_line`)."""
    from workers.judge import validity_line
    lines = []
    for block, title in (("judge", "judge"), ("dialogue", "general-instruction judge")):
        for name, s in (ev.get(block) or {}).items():
            lines.append(f"{title} of {name} ({s.get('backend')} {s.get('judge_model')}, {s.get('rubric') or 'two-score'}"
                         f" rubric, {s.get('scoring') or 'text'} scoring): "
                         f"{validity_line(s.get('validity')).removeprefix('judge validity: ')}")
    return lines


def summary_rows(ev: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary table: one row per metric, a column per model, then the change of
    each other model against the base (with its interval and test)."""
    names = _models(ev)
    base = ev.get("base") or (names[0] if names else None)
    others = [n for n in names if n != base]
    header = ["metric"] + names + [f"{n} − {base}" for n in others]
    models, cmps = ev.get("models") or {}, ev.get("comparisons") or {}
    rows: list[list[str]] = []

    def point(name: str, key: str) -> float | None:
        m = models.get(name) or {}
        return ((m.get(key) or {}).get("value"))

    acc = ["accuracy (95% CI)"] + [_pct(point(n, "accuracy"), models[n]["accuracy"].get("ci")) for n in names]
    for n in others:
        c = cmps.get(n)
        acc.append(f"{_pct(c['difference']['value'], c['difference'].get('ci'), signed=True)}; McNemar "
                   f"{_p(c['mcnemar']['p_value'])} (b={c['b']}, c={c['c']})" if c else "–")
    rows.append(acc)

    f1 = ["macro-F1 (95% CI)"] + [_pct(point(n, "macro_f1"), models[n]["macro_f1"].get("ci")) for n in names]
    for n in others:
        a, b = point(base, "macro_f1"), point(n, "macro_f1")
        f1.append(_pct(b - a, signed=True) if a is not None and b is not None else "–")
    rows.append(f1)

    fol = ["instruction following (95% CI)"]
    for n in names:
        f = _following(ev, n)
        fol.append(f"{_pct(f['value'], f.get('ci'))} (n={f['n']})" if f else "–")
    for n in others:
        fa, fb = _following(ev, base), _following(ev, n)
        fol.append(_pct(fb["value"] - fa["value"], signed=True) if fa and fb else "–")
    rows.append(fol)

    ece = ["calibration error (ECE, 15 bins)"]
    for n in names:
        cal = models[n].get("calibration") or {}
        ece.append(f"{cal['ece']:.3f} (n={cal['n']})" if cal.get("ece") is not None else "–")
    for n in others:
        ea, eb = (models[base].get("calibration") or {}).get("ece"), (models[n].get("calibration") or {}).get("ece")
        ece.append(f"{eb - ea:+.3f}" if ea is not None and eb is not None else "–")
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
    names = _models(ev)
    base = ev.get("base") or names[0]
    vs = [n for n in names if n != base] or names  # the fine-tuned models (the base alone if it is alone)
    m, cmps, bname = bl["metrics"], bl.get("comparisons") or {}, bl["name"]
    at = 1 + len(names)
    header.insert(at, bname)
    header += [f"{n} − {bname}" for n in vs]

    def acc_change(n: str) -> str:
        c = cmps.get(n)
        return (f"{_pct(c['difference']['value'], c['difference'].get('ci'), signed=True)}; McNemar "
                f"{_p(c['mcnemar']['p_value'])} (b={c['b']}, c={c['c']})" if c else "–")

    def f1_change(n: str) -> str:
        a, b = m["macro_f1"]["value"], ((ev["models"].get(n) or {}).get("macro_f1") or {}).get("value")
        return _pct(b - a, signed=True) if a is not None and b is not None else "–"

    cells = {"accuracy (95% CI)": (_pct(m["accuracy"]["value"], m["accuracy"].get("ci")), acc_change),
             "macro-F1 (95% CI)": (_pct(m["macro_f1"]["value"], m["macro_f1"].get("ci")), f1_change),
             "failed items (counted wrong)": (f"{m['n_failed']} of {m['n']}", lambda n: "")}
    for r in rows:
        own, change = cells.get(r[0], ("–", lambda n: ""))
        r.insert(at, own)
        r += [change(n) for n in vs]


def per_class_rows(ev: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per class, support then precision / recall / F1 of each model."""
    names = _models(ev)
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
            row += [f"{pc[k]:.3f}" for k in ("precision", "recall", "f1")] if pc else ["–"] * 3
        rows.append(row)
    bl = ev.get("baseline")
    if bl:  # the classical baseline's precision / recall / F1 after the models'
        header += [f"{bl['name']} {k}" for k in ("P", "R", "F1")]
        for lab, row in zip(classes, rows):
            pc = bl["metrics"]["per_class"].get(lab)
            row += [f"{pc[k]:.3f}" for k in ("precision", "recall", "f1")] if pc else ["–"] * 3
    return header, rows


# --------------------------------------------------------------------------------------------------
# Plots


def _fig(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_confusions(ev: Mapping[str, Any]) -> Figure:
    """Row-normalised confusion matrices side by side, annotated with counts."""
    names = _models(ev)
    fig = _fig(4.6 * len(names) + 0.6, 4.4)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, n in zip(axes, names):
        cm = ev["models"][n]["confusion"]
        counts = np.asarray(cm["counts"], dtype=float)  # (gold classes, predicted columns)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cm["cols"])), cm["cols"], rotation=35, ha="right")
        ax.set_yticks(range(len(cm["rows"])), cm["rows"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(n)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="share of gold row")
    return fig


def plot_per_class_f1(ev: Mapping[str, Any]) -> Figure:
    names = _models(ev)
    _, rows = per_class_rows(ev)
    classes = [r[0] for r in rows]
    fig = _fig(max(5.0, 1.3 * len(classes) + 2), 3.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    x = np.arange(len(classes))
    for k, n in enumerate(names):
        pcs = ev["models"][n]["per_class"]
        vals = [pcs.get(c.replace(" (not trained)", ""), {}).get("f1", 0.0) for c in classes]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=n, color=COLOURS[k % len(COLOURS)])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("F1")
    ax.set_title("per-class F1")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_calibration(ev: Mapping[str, Any]) -> Figure | None:
    names = [n for n in _models(ev) if (ev["models"][n].get("calibration") or {}).get("bins")]
    if not names:
        return None
    fig = _fig(5.0, 4.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for k, n in enumerate(names):
        cal = ev["models"][n]["calibration"]
        conf = [b["confidence"] for b in cal["bins"]]
        acc = [b["accuracy"] for b in cal["bins"]]
        ax.plot(conf, acc, marker="o", color=COLOURS[k % len(COLOURS)], label=f"{n} (ECE {cal['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of its answer)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability")
    ax.legend(fontsize=8)
    return fig


def _loss_points(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[tuple[float, float]]:
    pts = []
    for i, r in enumerate(rows):
        v = next((r[k] for k in keys if r.get(k) is not None), None)
        if v is not None:
            pts.append((float(r.get("step", i)), float(v)))
    return pts


def plot_loss(loss_history: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Training loss per step and validation loss per evaluation (rows {step, loss, val_loss?}; the names
    train_loss and eval_loss are read too)."""
    train = _loss_points(loss_history, ("loss", "train_loss"))
    val = _loss_points(loss_history, ("val_loss", "eval_loss", "validation_loss"))
    if not train and not val:
        return None
    fig = _fig(6.0, 3.8)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), color=COLOURS[0], lw=1.2, label="training loss")
    if val:
        ax.plot(*zip(*val), color=COLOURS[1], marker="o", lw=1.5, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_time_to_accuracy(loss_history: Sequence[Mapping[str, Any]],
                          ev: Mapping[str, Any] | None = None) -> Figure | None:
    """Validation accuracy against training seconds (eval rows {val_accuracy, train_s}), with the classical
    baseline's accuracy on the evaluated items as a dashed reference line when the evaluation has one."""
    pts = [(float(r["train_s"]), float(r["val_accuracy"])) for r in loss_history
           if r.get("val_accuracy") is not None and r.get("train_s") is not None]
    if not pts:
        return None
    pts.sort()
    fig = _fig(6.0, 3.8)
    ax = fig.subplots()
    ax.plot(*zip(*pts), color=COLOURS[2], marker="o", lw=1.5, label="validation accuracy")
    bl = (ev or {}).get("baseline")
    if bl:
        acc = bl["metrics"]["accuracy"]["value"]
        ax.axhline(acc, color="grey", ls="--", lw=1, label=f"{bl['name']} on the evaluated items ({acc * 100:.1f}%)")
    ax.set_xlabel("training seconds (optimizer steps, validation excluded)")
    ax.set_ylabel("accuracy")
    ax.set_title("time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_judge(ev: Mapping[str, Any], block: str = "judge") -> Figure | None:
    """Score histograms of each judged model, one panel per scale of the rubric."""
    judge = ev.get(block) or {}
    if not judge:
        return None
    scales = next((s["scales"] for s in judge.values() if s.get("scales")), ["coherence", "following"])
    fig = _fig(4.5 * len(scales), 3.6)
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    for ax, key in zip(axes, scales):
        for k, (n, s) in enumerate(judge.items()):
            edges = np.asarray(s["histogram"]["edges"], dtype=float)
            counts = np.asarray(s["histogram"].get(key) or np.zeros(len(edges) - 1), dtype=float)
            ax.stairs(counts, edges, label=f"{n} (scored {s['n_scored']}, unscored {s['n_unscored']})"
                      + ("" if s.get("evidence", True) else ", not evidence"),
                      color=COLOURS[k % len(COLOURS)], lw=2, fill=len(judge) == 1, alpha=0.8)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{key} score")
        ax.set_ylabel("responses")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{'judge' if block == 'judge' else 'general instructions'}: {key}")
    axes[0].legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------
# HTML


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{max-width:100%;display:block;margin:.5rem 0 1.5rem}
.note{color:#666;font-size:.85rem} li{margin:.2rem 0}
"""


def _baseline_note(ev: Mapping[str, Any]) -> str:
    bl = ev.get("baseline")
    if not bl:
        return ""
    return (f"<p class='note'>{html.escape(bl['name'])}: {html.escape(bl['method'])}, fitted on "
            f"{bl['n_train']} training texts in {bl['fit_s']:.1f} s and scored on the same {bl['n_items']} items "
            f"as the models. The changes against it are paired (b = the baseline right and the model wrong, "
            f"c = the reverse).</p>")


def write_report(evaluation: Mapping[str, Any], out_dir: Path, *,
                 loss_history: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write `report.html` and its PNG plots (also embedded in the page) into out_dir.

    Args:
        evaluation: the document from `workers.evaluation.evaluate.evaluate_runs`.
        out_dir: created if needed.
        loss_history: training rows {step, loss, val_loss?, val_accuracy?, train_s?}, for the loss curves
            and the time-to-accuracy plot.

    Returns:
        The path of report.html.

    Raises:
        ValueError: the evaluation holds no models.
    """
    if not evaluation.get("models"):
        raise ValueError("the evaluation holds no models: build it with workers.evaluation.evaluate.evaluate_runs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}

    def save(fig: Figure | None, name: str) -> None:
        if fig is None:
            return
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        data = buf.getvalue()
        (out_dir / name).write_bytes(data)
        images[name] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    save(plot_confusions(evaluation), "confusion.png")
    save(plot_per_class_f1(evaluation), "per_class_f1.png")
    save(plot_calibration(evaluation), "calibration.png")
    save(plot_loss(loss_history) if loss_history else None, "loss.png")
    save(plot_time_to_accuracy(loss_history, evaluation) if loss_history else None, "time_to_accuracy.png")
    save(plot_judge(evaluation), "judge_scores.png")
    save(plot_judge(evaluation, "dialogue"), "dialogue_scores.png")

    def img(name: str, alt: str) -> str:
        return f'<img src="{images[name]}" alt="{html.escape(alt)}">' if name in images else \
            f'<p class="note">{html.escape(alt)}: no data.</p>'

    title = evaluation.get("name") or "newslora evaluation"
    names = _models(evaluation)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Models: {html.escape(', '.join(names))}; base: {html.escape(str(evaluation.get('base')))}; "
        f"labels: {html.escape(', '.join(evaluation.get('label_names') or []))}.</p>",
        "<h2 id='summary'>Summary</h2>", _table(*summary_rows(evaluation)),
        "<p class='note'>Accuracy and instruction following: Wilson 95% intervals. Macro-F1, judge means and "
        "paired differences: bootstrap 95% intervals. Accuracy differences: McNemar test on the items both "
        "models answered (b = base right and the other wrong, c = the reverse; exact binomial below 25 "
        "discordant pairs). Failed items count as wrong.</p>",
        _baseline_note(evaluation),
        "<h2 id='per-class'>Per class</h2>", _table(*per_class_rows(evaluation)),
        "<h2 id='confusion'>Confusion matrices</h2>", img("confusion.png", "confusion matrices"),
        "<h2 id='f1'>Per-class F1</h2>", img("per_class_f1.png", "per-class F1"),
        "<h2 id='calibration'>Calibration</h2>", img("calibration.png", "reliability diagram"),
        "<h2 id='loss'>Training and validation loss</h2>", img("loss.png", "loss curves"),
        "<h2 id='time-to-accuracy'>Time to accuracy</h2>",
        img("time_to_accuracy.png", "validation accuracy against training seconds"),
        "<h2 id='judge'>Judge scores</h2>", img("judge_scores.png", "judge score distributions"),
        "<h2 id='dialogue'>General instructions (judged)</h2>",
        "<p class='note'>Answers to the shipped general-instruction set, scored by the judge: does fine-tuning "
        "leave the model able to follow other instructions?</p>",
        img("dialogue_scores.png", "general-instruction score distributions"),
    ]
    jrows = [[f"{n} ({block})", str(s.get("judge_model")), str(s.get("backend")), str(s.get("model_digest"))[:24],
              str(s.get("rubric_version")), str(s["n_scored"]), str(s["n_unscored"]),
              ", ".join(f"{k}: {v}" for k, v in s["unscored_reasons"].items()), _validity_cell(s)]
             for block in ("judge", "dialogue") for n, s in (evaluation.get(block) or {}).items()]
    if jrows:
        parts.append("<h3>Judges</h3>")
        parts.append(_table(["model judged", "judge", "backend", "digest", "rubric", "scored", "unscored",
                             "unscored reasons", "validity on its control set"], jrows))
        parts.append("<p class='note'>Validity: before its scores count as evidence, each judge run also scores a "
                     "control set built from the same task (for the same article, the gold label's answer and a "
                     "wrong label's; for a general instruction, its reference answer and another item's). A pair "
                     "counts only when the correct answer scores strictly higher (ties and unscored answers count "
                     "against the judge); Wilson 95% intervals; chance is 50%. Self-agreement: repeated control "
                     "items scored within 5 points of their first score.</p>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in judge_validity_lines(evaluation))
                     + "</ul>")
    missing = evaluation.get("missing") or []
    parts.append("<h2 id='missing'>Missing or partial</h2>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>" if missing
                 else "<p>Nothing missing.</p>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def render_table(evaluation: Mapping[str, Any], *, width: int = 140) -> str:
    """The summary and per-class tables as plain text for a terminal."""
    from rich.console import Console
    from rich.table import Table

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
