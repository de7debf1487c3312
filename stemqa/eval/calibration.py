"""Calibration of a mode's probabilities on dev data: temperature, expected calibration error, "unsure" threshold.

Pure functions over per-question option scores and gold indices (no model): `fit_temperature` minimises the
negative log-likelihood of the gold option under softmax(score / T) (Guo et al., "On Calibration of Modern
Neural Networks", 2017); `expected_calibration_error` is the usual equal-width-bin ECE over the top
probability; `choose_threshold` picks the confidence under which the assistant says it is unsure.

Why by hand: the fit is one convex scalar problem (NLL is convex in 1/T) and ECE a dozen lines; a library
(netcal, torch LBFGS) would add a dependency or a model-sized framework for a few microseconds of work.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from stemqa.eval.modes import log_softmax, softmax


def nll(scores: Sequence[Sequence[float]], gold: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood of the gold options under softmax(score / temperature)."""
    if not scores:
        raise ValueError("no questions to calibrate on")
    return -sum(log_softmax([x / temperature for x in row])[g] for row, g in zip(scores, gold)) / len(scores)


def fit_temperature(scores: Sequence[Sequence[float]], gold: Sequence[int], lo: float = 1e-3,
                    hi: float = 1e3, iters: int = 100) -> float:
    """The temperature minimising `nll`: golden-section search on log(1/T) (NLL is convex in 1/T)."""
    a, b = math.log(1 / hi), math.log(1 / lo)
    phi = (math.sqrt(5) - 1) / 2
    f = lambda u: nll(scores, gold, 1 / math.exp(u))  # noqa: E731
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(d)
    return 1 / math.exp((a + b) / 2)


def top_confidence(scores: Sequence[Sequence[float]], temperature: float = 1.0) -> list[tuple[float, int]]:
    """(top probability, predicted index) per question."""
    out = []
    for row in scores:
        p = softmax(row, temperature)
        best = max(range(len(p)), key=p.__getitem__)
        out.append((p[best], best))
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float:
    """Sum over equal-width confidence bins of (bin share) x |bin accuracy - bin mean confidence|."""
    n = len(confidence)
    if n == 0:
        raise ValueError("no questions")
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo < c <= hi or (b == 0 and c == 0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            conf = sum(confidence[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total


@dataclass(frozen=True)
class Threshold:
    """The 'unsure' threshold on calibrated top probability, and what it means on the dev questions."""

    unsure_below: float
    coverage: float  # share of dev questions answered (confidence >= unsure_below)
    accuracy_when_sure: Optional[float]  # dev accuracy of those
    accuracy_when_unsure: Optional[float]  # dev accuracy of the rest: how often it is right when it says unsure
    wrong_cost: float


def choose_threshold(confidence: Sequence[float], correct: Sequence[bool], wrong_cost: float = 1.0) -> Threshold:
    """Answer a question only when its confidence is at least the threshold maximising, over the dev questions,
    (right answers given) - wrong_cost x (wrong answers given); "unsure" costs nothing. With wrong_cost 1 a
    calibrated assistant answers when it is more likely right than wrong. Ties go to the lower threshold; when no
    threshold gains anything the threshold is above every confidence: it is always unsure (a finding, not an error).
    """
    if not confidence:
        raise ValueError("no questions")
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    best_gain, best_k, gain = 0.0, 0, 0.0
    for k, i in enumerate(order, 1):  # answer the k most confident
        gain += 1.0 if correct[i] else -wrong_cost
        last = k == len(order) or confidence[order[k]] < confidence[i]  # a threshold cannot split equal confidences
        if last and gain >= best_gain and (gain > best_gain or k > best_k):
            best_gain, best_k = gain, k
    if best_k == 0:
        unsure_below = min(1.0, confidence[order[0]] + 1e-6)
    else:
        unsure_below = confidence[order[best_k - 1]]
    sure = [correct[i] for i in order[:best_k]]
    unsure = [correct[i] for i in order[best_k:]]
    return Threshold(round(unsure_below, 6), best_k / len(order), sum(sure) / len(sure) if sure else None,
                     sum(unsure) / len(unsure) if unsure else None, wrong_cost)


@dataclass(frozen=True)
class Calibration:
    """Temperature fit of one (model, mode) on dev, with ECE before/after and the chosen threshold."""

    n: int
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    threshold: Threshold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        """From `to_dict`'s output (extra keys, e.g. accuracies saved beside it, are ignored)."""
        return cls(d["n"], d["temperature"], d["nll_before"], d["nll_after"], d["ece_before"], d["ece_after"],
                   Threshold(**d["threshold"]))


def calibrate(scores: Sequence[Sequence[float]], gold: Sequence[int], wrong_cost: float = 1.0,
              bins: int = 15) -> Calibration:
    """Fit T on (scores, gold), measure ECE at T=1 and at T, choose the threshold on the calibrated confidences."""
    t = fit_temperature(scores, gold)
    before, after = top_confidence(scores, 1.0), top_confidence(scores, t)
    right_before = [b == g for (_, b), g in zip(before, gold)]
    right_after = [b == g for (_, b), g in zip(after, gold)]
    return Calibration(len(scores), t, nll(scores, gold, 1.0), nll(scores, gold, t),
                       expected_calibration_error([c for c, _ in before], right_before, bins),
                       expected_calibration_error([c for c, _ in after], right_after, bins),
                       choose_threshold([c for c, _ in after], right_after, wrong_cost))
