"""Statistics, in one home: every interval, test and calibration figure newslora reports.

Used by evaluation (accuracy, F1, McNemar, ECE), the judge (control-pair validity, score means) and the
dashboard, so each number is computed one way everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ECE_BINS = 15
EXACT_MCNEMAR_BELOW = 25  # discordant pairs: exact binomial below this, chi-square with correction at or above


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a binomial proportion k/n (None when n == 0).

    Better than the normal interval near 0 and 1 and for small n; never leaves [0, 1].
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k} is not between 0 and n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_test(b: int, c: int) -> dict[str, Any]:
    """McNemar's test on the discordant counts of a paired comparison.

    Args:
        b: pairs where the first model is right and the second wrong.
        c: pairs where the first model is wrong and the second right.

    Returns:
        {"method": "exact" | "chi2_cc" | "none", "statistic": float | None, "p_value": float}.
        Exact two-sided binomial (p=0.5) when b + c < 25, else the chi-square statistic with
        continuity correction (|b - c| - 1)^2 / (b + c) on 1 degree of freedom.
    """
    n = b + c
    if n == 0:
        return {"method": "none", "statistic": None, "p_value": 1.0}
    if n < EXACT_MCNEMAR_BELOW:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        return {"method": "exact", "statistic": float(k), "p_value": min(1.0, 2 * tail)}
    stat = (abs(b - c) - 1) ** 2 / n
    # The chi-square(1) survival function: P(X > s) = erfc(sqrt(s / 2)).
    return {"method": "chi2_cc", "statistic": float(stat), "p_value": float(math.erfc(math.sqrt(stat / 2)))}


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins.

    Bin i holds confidences in (i/n_bins, (i+1)/n_bins]; a confidence of exactly 0 goes to the first bin.
    ECE = sum over bins of (bin size / n) * |bin accuracy - bin mean confidence|.

    Returns:
        {"ece": float | None (None without items), "n": int, "n_bins": int,
         "bins": [{"lo", "hi", "n", "accuracy", "confidence"}] for non-empty bins}.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape:
        raise ValueError(f"{len(conf)} confidences but {len(hit)} correctness flags")
    if conf.size and (np.any(conf < -1e-6) | np.any(conf > 1 + 1e-6) | np.any(~np.isfinite(conf))):
        raise ValueError("confidences must lie in [0, 1]: pass probabilities, not logits")
    conf = np.clip(conf, 0.0, 1.0)  # float error from a softmax (1.0000001) is not a bad input
    if conf.size == 0:
        return {"ece": None, "n": 0, "n_bins": n_bins, "bins": []}
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # (n,) bin of each item
    ece = 0.0
    bins = []
    for i in range(n_bins):
        m = idx == i
        cnt = int(m.sum())
        if not cnt:
            continue
        acc, mc = float(hit[m].mean()), float(conf[m].mean())
        ece += cnt / conf.size * abs(acc - mc)
        bins.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "n": cnt, "accuracy": acc, "confidence": mc})
    return {"ece": float(ece), "n": int(conf.size), "n_bins": n_bins, "bins": bins}


def percentile_ci(samples: np.ndarray) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def mean_ci(values: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any] | None:
    """Mean, bootstrap 95% CI (percentile), sample std and count of `values` (None when empty)."""
    if values.size == 0:
        return None
    ci = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        boots = values[rng.integers(0, values.size, size=(bootstrap, values.size))].mean(axis=1)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        ci = [float(lo), float(hi)]
    return {"mean": float(values.mean()), "ci": ci, "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}
