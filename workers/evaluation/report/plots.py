"""The report's plots: confusion matrices, per-class F1, reliability, training curves, judge scores.

matplotlib's Agg canvas is used directly (no pyplot global state, safe in a worker thread).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from core.contracts.judge import DEFAULT_SCALES
from core.formatting import pct
from workers.evaluation.report.tables import judge_summaries, model_names, per_class_rows

COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def _fig(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_confusions(ev: Mapping[str, Any]) -> Figure:
    """Row-normalised confusion matrices side by side, annotated with counts."""
    names = model_names(ev)
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
    names = model_names(ev)
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
    names = [n for n in model_names(ev) if (ev["models"][n].get("calibration") or {}).get("bins")]
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
        ax.axhline(acc, color="grey", ls="--", lw=1, label=f"{bl['name']} on the evaluated items ({pct(acc)})")
    ax.set_xlabel("training seconds (optimizer steps, validation excluded)")
    ax.set_ylabel("accuracy")
    ax.set_title("time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_judge(ev: Mapping[str, Any], block: str = "judge") -> Figure | None:
    """Score histograms of each judged model, one panel per scale of the rubric."""
    judge = judge_summaries(ev, block)
    if not judge:
        return None
    scales = next((s.scales for s in judge.values() if s.scales), DEFAULT_SCALES)
    fig = _fig(4.5 * len(scales), 3.6)
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    for ax, key in zip(axes, scales):
        for k, (n, s) in enumerate(judge.items()):
            edges = np.asarray(s.histogram["edges"], dtype=float)
            counts = np.asarray(s.histogram.get(key) or np.zeros(len(edges) - 1), dtype=float)
            ax.stairs(counts, edges, label=f"{n} (scored {s.n_scored}, unscored {s.n_unscored})"
                      + (", not evidence" if s.not_evidence else ""),
                      color=COLOURS[k % len(COLOURS)], lw=2, fill=len(judge) == 1, alpha=0.8)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{key} score")
        ax.set_ylabel("responses")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{'judge' if block == 'judge' else 'general instructions'}: {key}")
    axes[0].legend(fontsize=7)
    return fig
