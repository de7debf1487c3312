"""Wilson intervals, the paired bootstrap, calibration (temperature, ECE, the 'unsure' threshold): pure functions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stemqa.eval.calibration import (calibrate, choose_threshold, expected_calibration_error, fit_temperature, nll,
                                     top_confidence)
from stemqa.eval.stats import paired_bootstrap, paired_outcomes, wilson


def test_wilson_known_values():
    # reference values (statsmodels proportion_confint(method="wilson"))
    a = wilson(45, 100)
    assert (a.low, a.high) == pytest.approx((0.3561, 0.5475), abs=1e-4)
    z = wilson(0, 20)
    assert z.low == 0 and z.high == pytest.approx(0.1611, abs=1e-4)  # k=0 still has a non-zero upper bound
    assert wilson(20, 20).high == 1 and wilson(20, 20).low == pytest.approx(0.8389, abs=1e-4)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson(0, 0)
    with pytest.raises(ValueError, match="k=5"):
        wilson(5, 4)


def test_paired_bootstrap_sees_pairing():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.5
    # B = A with 30 wrong answers turned right: a small, consistent gain; paired it is clearly above 0
    better = base.copy()
    better[np.flatnonzero(~base)[:30]] = True
    d = paired_bootstrap(better, base, seed=0)
    assert d.delta == pytest.approx(30 / 400)
    assert d.above_zero and d.low > 0.04
    # two independent models of the same accuracy: the interval spans 0 and is wider than the paired gain's
    a, b = rng.random(400) < 0.5, rng.random(400) < 0.5
    indep = paired_bootstrap(a, b, seed=0)
    assert indep.low < 0 < indep.high and indep.high - indep.low > 2 * (d.high - d.low)
    same = paired_bootstrap(base, base)
    assert same.delta == 0 and same.low == 0 and same.high == 0 and not same.above_zero
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap([True], [True, False])


def test_paired_outcomes_align_by_id_and_refuse_different_questions():
    a, b = paired_outcomes({"q2": True, "q1": False}, {"q1": True, "q2": True})
    assert a == [False, True] and b == [True, True]
    with pytest.raises(ValueError, match="different questions"):
        paired_outcomes({"q1": True}, {"q2": True})


def _calibrated_dev(n=4000, seed=0):
    """Scores whose softmax at T=0.5 is the true probability of each option being right (so T* = 0.5)."""
    rng = np.random.default_rng(seed)
    scores, gold = [], []
    for _ in range(n):
        s = rng.normal(0, 1.5, 4)
        p = np.exp(s / 0.5 - np.max(s / 0.5))
        p /= p.sum()
        scores.append(s.tolist())
        gold.append(int(rng.choice(4, p=p)))
    return scores, gold


def test_fit_temperature_recovers_the_true_temperature():
    scores, gold = _calibrated_dev()
    t = fit_temperature(scores, gold)
    assert t == pytest.approx(0.5, rel=0.08)
    assert nll(scores, gold, t) <= min(nll(scores, gold, x) for x in (0.3, 0.45, 0.55, 1.0, 2.0)) + 1e-9


def test_calibration_lowers_ece_and_threshold_marks_coin_tosses_unsure():
    scores, gold = _calibrated_dev()
    overconfident = [[x * 3 for x in row] for row in scores]  # T=1 on these is far too sharp
    cal = calibrate(overconfident, gold)
    assert cal.ece_after < 0.03 < cal.ece_before
    assert cal.nll_after < cal.nll_before
    th = cal.threshold
    # calibrated and wrong answers cost as much as right ones gain: answer when more likely right than wrong
    assert 0.4 < th.unsure_below < 0.6
    assert th.accuracy_when_sure > 0.5 > th.accuracy_when_unsure
    # the web page's example: "C. Nitrogen" 31.9% vs "A. Oxygen" 31.8% is a coin toss, said as "unsure"
    assert 0.319 < th.unsure_below


def test_threshold_edge_cases():
    # never right: answering anything only loses, so the threshold is above every confidence
    th = choose_threshold([0.9, 0.8, 0.7], [False, False, False])
    assert th.unsure_below > 0.9 and th.coverage == 0 and th.accuracy_when_sure is None
    # always right: answer everything
    th = choose_threshold([0.9, 0.3, 0.2], [True, True, True])
    assert th.unsure_below == 0.2 and th.coverage == 1 and th.accuracy_when_unsure is None
    # equal confidences are never split by a threshold
    th = choose_threshold([0.6, 0.6, 0.6, 0.3], [True, True, False, False])
    assert th.unsure_below == 0.6 and th.coverage == 0.75
    # a higher cost of a wrong answer raises the bar
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    right = [True, True, True, False, True]
    assert choose_threshold(conf, right, wrong_cost=3).unsure_below >= choose_threshold(conf, right).unsure_below


def test_ece_and_top_confidence():
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    (p, i), = top_confidence([[0.0, math.log(3)]])
    assert i == 1 and p == pytest.approx(0.75)
