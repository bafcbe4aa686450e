"""Statistics against values computed by hand."""
from __future__ import annotations

import pytest

from core.stats import expected_calibration_error, mcnemar_test, wilson_interval


def test_wilson_interval_hand_values():
    # p = 3/7, z = 1.96: centre (p + z²/2n)/(1 + z²/n) = 0.45388, half-width 0.29566.
    lo, hi = wilson_interval(3, 7)
    assert lo == pytest.approx(0.158220, abs=1e-5)
    assert hi == pytest.approx(0.749542, abs=1e-5)
    lo, hi = wilson_interval(2, 3)
    assert (lo, hi) == pytest.approx((0.207660, 0.938508), abs=1e-5)
    # All right: the interval stays below 1 on the low side and ends at 1.
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.722467, abs=1e-5)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_ece_two_bin_hand_example():
    # bin (0, .5]: conf .2 .4 -> mean .3, accuracy .5;  bin (.5, 1]: conf .6 .9 -> mean .75, accuracy 1.
    # ECE = 2/4 * |.5 - .3| + 2/4 * |1 - .75| = .1 + .125
    out = expected_calibration_error([0.2, 0.4, 0.6, 0.9], [False, True, True, True], n_bins=2)
    assert out["ece"] == pytest.approx(0.225)
    assert [b["n"] for b in out["bins"]] == [2, 2]
    assert out["bins"][0]["confidence"] == pytest.approx(0.3)
    # 0.5 is the top edge of the first bin; 0 belongs to the first bin too.
    edge = expected_calibration_error([0.5, 0.0], [True, False], n_bins=2)
    assert [b["n"] for b in edge["bins"]] == [2]
    assert edge["ece"] == pytest.approx(abs(0.5 - 0.25))
    assert expected_calibration_error([], [], n_bins=2)["ece"] is None
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([1.5], [True])


def test_mcnemar_exact_and_chi_square():
    exact = mcnemar_test(1, 6)  # 2 * (C(7,0) + C(7,1)) / 2^7
    assert exact["method"] == "exact" and exact["p_value"] == pytest.approx(0.125)
    assert mcnemar_test(3, 3)["p_value"] == pytest.approx(1.0)
    chi = mcnemar_test(10, 25)  # (|10 - 25| - 1)^2 / 35 = 5.6; P(chi2_1 > 5.6) = 0.017960
    assert chi["method"] == "chi2_cc"
    assert chi["statistic"] == pytest.approx(5.6)
    assert chi["p_value"] == pytest.approx(0.0179605, abs=1e-6)
    assert mcnemar_test(12, 12)["method"] == "exact"  # 24 discordant pairs: still exact
    assert mcnemar_test(12, 13)["method"] == "chi2_cc"
    assert mcnemar_test(0, 0) == {"method": "none", "statistic": None, "p_value": 1.0}
