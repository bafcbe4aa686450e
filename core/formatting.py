"""How a figure is written for people, in one place: the report, the terminal table, the judge's
validity sentence and the dashboard all write a proportion, a score or a p-value the same way."""
from __future__ import annotations

from typing import Sequence

MISSING = "–"  # what a figure that could not be computed is shown as


def pct(x: float | None, ci: Sequence[float] | None = None, *, signed: bool = False, digits: int = 1) -> str:
    """A proportion as a percentage, with its interval: 0.853, [0.82, 0.88] -> '85.3% [82.0, 88.0]';
    signed (a difference): '+3.1 pts [...]'; None -> '–'."""
    if x is None:
        return MISSING
    s = f"{x * 100:+.{digits}f} pts" if signed else f"{x * 100:.{digits}f}%"
    if ci:
        s += f" [{ci[0] * 100:.{digits}f}, {ci[1] * 100:.{digits}f}]"
    return s


def num(x: float | None, ci: Sequence[float] | None = None, *, digits: int = 1, signed: bool = False) -> str:
    """A number with its interval: 47.5, [40.1, 55.0] -> '47.5 [40.1, 55.0]'; None -> '–'."""
    if x is None:
        return MISSING
    s = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    if ci:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def p_value(p: float | None) -> str:
    """'p = 0.031', 'p < 0.001', or '' when there is none."""
    if p is None:
        return ""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
