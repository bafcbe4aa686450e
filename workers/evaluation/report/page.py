"""The report page: one self-contained HTML file, its plots embedded as PNG data URIs (and written beside it)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from workers.evaluation.report.plots import (plot_calibration, plot_confusions, plot_judge, plot_loss,
                                             plot_per_class_f1, plot_time_to_accuracy)
from workers.evaluation.report.tables import (judge_summaries, judge_validity_lines, model_names, per_class_rows,
                                              summary_rows)
from workers.judge import validity_cell


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
    names = model_names(evaluation)
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
    jrows = [[f"{n} ({block})", str(s.judge_model), str(s.backend), str(s.model_digest)[:24], str(s.rubric_version),
              str(s.n_scored), str(s.n_unscored), ", ".join(f"{k}: {v}" for k, v in s.unscored_reasons.items()),
              validity_cell(s.validity)]
             for block in ("judge", "dialogue") for n, s in judge_summaries(evaluation, block).items()]
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
