"""Fit an answer mode on dev questions: the PriDe letter prior (no labels), then temperature and "unsure" threshold.

    params, cal, preds = fit_mode(scorer, "letter_debiased", dev_records, model="...", fitted_on="...")
    params.save("mode_params.json")     # what `stemqa eval` (eval.mode_params) and serving load

`fit_mode` returns the fitted `ModeParams`, the `Calibration` (ECE before/after, threshold and the dev accuracy
on either side of it) and the dev predictions with the calibrated probabilities (the temperature changes no
prediction; the debiasing does).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from stemqa.data.mcq import LETTERS, MCQ
from stemqa.eval.calibration import Calibration, calibrate
from stemqa.eval.modes import ModeParams, as_params, cloze_scores, debias, log_softmax, position_prior
from stemqa.eval.scorer import MCQScorer, Prediction, predict

# Questions per scorer call: big enough for well-packed length-sorted batches, small enough to show progress.
CHUNK = 256


def fit_letter_prior(scorer: MCQScorer, records: Sequence[MCQ], header: bool = True,
                     k: Optional[int] = None) -> dict[int, list[float]]:
    """PriDe's prior over option positions, per number of options: the mean over `records` of each question's
    `position_prior` (from k cyclic permutations of its options). Labels are not read."""
    sums: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for start in range(0, len(records), CHUNK):
        part = records[start:start + CHUNK]
        ctx = [dict(fewshot=(), header=header, passages=None)] * len(part)
        for q, (_, rows) in zip(part, scorer.position_logprobs(part, ctx, k)):
            n = len(q.choices)
            prior = position_prior([log_softmax(r) for r in rows])
            acc = sums.setdefault(n, [0.0] * n)
            for j, p in enumerate(prior):
                acc[j] += p
            counts[n] = counts.get(n, 0) + 1
    return {n: [v / counts[n] for v in acc] for n, acc in sums.items()}


def fit_mode(scorer: MCQScorer, scoring: Union[str, ModeParams], dev: Sequence[MCQ], model: str = "",
             fitted_on: str = "", header: bool = True, wrong_cost: float = 1.0, prior_questions: Optional[int] = None
             ) -> tuple[ModeParams, Calibration, list[Prediction]]:
    """Fit `scoring` (a mode name or ModeParams) on the dev questions. letter_debiased gets its prior here, from
    the first `prior_questions` of `dev` (all by default; PriDe itself estimates it on a few percent of the
    questions, since it costs one forward pass per option per question)."""
    if not dev:
        raise ValueError("no dev questions to fit the mode on")
    if isinstance(scoring, str) and scoring == "letter_debiased":
        params = ModeParams(mode="letter_debiased",
                            letter_prior=fit_letter_prior(scorer, dev[:prior_questions or len(dev)], header))
    else:
        params = as_params(scoring).model_copy(update=dict(temperature=1.0, unsure_below=None))
    preds: list[Prediction] = []
    for start in range(0, len(dev), CHUNK):
        preds += scorer.score(dev[start:start + CHUNK], params, header=header)
    return fit_from_predictions(params, preds, model, fitted_on, wrong_cost)


def fit_from_predictions(params: ModeParams, preds: Sequence[Prediction], model: str = "", fitted_on: str = "",
                         wrong_cost: float = 1.0) -> tuple[ModeParams, Calibration, list[Prediction]]:
    """Temperature and threshold from dev predictions already scored in `params`'s mode (their `scores`); the
    predictions come back with the calibrated probabilities and the unsure flag."""
    gold = [LETTERS.index(p.gold) for p in preds]
    cal = calibrate([p.scores for p in preds], gold, wrong_cost)
    th = cal.threshold
    fitted = ModeParams.model_validate(params.model_copy(update=dict(
        temperature=cal.temperature, unsure_below=th.unsure_below, accuracy_when_unsure=th.accuracy_when_unsure,
        accuracy_when_sure=th.accuracy_when_sure, model=model, fitted_on=fitted_on)).model_dump())
    return fitted, cal, [predict(p.id, p.subject, p.gold, p.loglikelihoods, p.scores, fitted) for p in preds]


def rescored(preds: Sequence[Prediction], params: ModeParams, choices: Sequence[Sequence[str]]) -> list[Prediction]:
    """Predictions in `params`'s mode from the saved log-likelihoods of the same forward passes: cloze under
    either normalisation from cloze predictions, letter or letter_debiased from letter predictions."""
    if params.mode == "cloze":
        scores = [cloze_scores(p.loglikelihoods, c, params.cloze_norm) for p, c in zip(preds, choices)]
    elif params.mode in ("letter", "letter_debiased"):
        scores = [p.loglikelihoods if params.mode == "letter" else
                  debias(log_softmax(p.loglikelihoods), params.letter_prior.get(len(p.loglikelihoods)))
                  for p in preds]
    else:
        raise ValueError(f"{params.mode} predictions need their own forward passes (not a rescoring)")
    return [predict(p.id, p.subject, p.gold, p.loglikelihoods, sc, params) for p, sc in zip(preds, scores)]


def fit_on_dev(scorer: MCQScorer, modes: Sequence[str], sets: dict[str, Sequence[MCQ]], out_dir, model: str = "",
               prior_questions: int = 64, wrong_cost: float = 1.0, on_mode=None) -> dict[str, dict]:
    """Fit every mode of `modes` on the pooled dev `sets` ({name: questions}) and write, per mode,
    out_dir/<mode>/{mode_params.json, calibration.json, <set>/predictions.jsonl, <set>/metrics.json}; returns
    {mode label: {"dir", "accuracy": {set: acc, "pooled": acc}}}. letter_debiased reuses the letter mode's forward
    passes (rescored with the PriDe prior, fitted without labels on the first `prior_questions`), so it costs only
    the prior's k passes per question of that sample. `on_mode(label)` is called as each mode starts."""
    from pathlib import Path

    from stemqa.data.splits import share

    pooled = [q for qs in sets.values() for q in qs]
    fitted_on = ", ".join(f"{name} {len(qs)}" for name, qs in sets.items())
    # modes that reuse another's forward passes go after it: letter_debiased after letter, cloze_*_acc after cloze_*
    order = sorted(modes, key=lambda m: m == "letter_debiased" or m.endswith("_acc"))
    letter: Optional[list[Prediction]] = None
    scored: dict[str, list[Prediction]] = {}
    out: dict[str, dict] = {}
    for mode in order:
        if on_mode is not None:
            on_mode(mode)
        if mode.endswith("_acc") and mode[:-4] in scored:  # the same log-likelihoods, not length-normalised
            params = as_params(mode)
            params, cal, preds = fit_from_predictions(
                params, rescored(scored[mode[:-4]], params, [q.choices for q in pooled]), model, fitted_on,
                wrong_cost)
        elif mode == "letter_debiased":
            if letter is None:
                letter = fit_mode(scorer, "letter", pooled, model, fitted_on, wrong_cost=wrong_cost)[2]
            sample = sorted(pooled, key=lambda q: share("prior/" + q.id))[:prior_questions]  # hashed, all sets
            params = ModeParams(mode="letter_debiased", letter_prior=fit_letter_prior(scorer, sample))
            params, cal, preds = fit_from_predictions(
                params, rescored(letter, params, [q.choices for q in pooled]), model,
                f"{fitted_on}; prior from {min(prior_questions, len(pooled))} of them, labels unused", wrong_cost)
        else:
            params, cal, preds = fit_mode(scorer, mode, pooled, model, fitted_on, wrong_cost=wrong_cost)
            scored[mode] = preds
            if mode == "letter":
                letter = preds
        label = params.label()
        d = Path(out_dir) / label
        accs = save_fitted_mode(d, model, label, sets, params, cal, preds)
        out[label] = {"dir": str(d), "accuracy": accs}
    return out


def save_fitted_mode(d, model: str, label: str, sets: dict[str, Sequence[MCQ]], params: ModeParams, cal: Calibration,
                     preds: Sequence[Prediction], extra: Optional[dict] = None) -> dict[str, float]:
    """Write a fitted mode: d/mode_params.json, d/<set>/{predictions.jsonl, metrics.json} for each of `sets` and
    d/calibration.json (accuracies, the calibration, `extra`); returns {set: accuracy, "pooled": accuracy}."""
    import json
    from pathlib import Path

    from stemqa.eval.run import write_results
    from stemqa.eval.scorer import accuracy

    d = Path(d)
    params.save(d / "mode_params.json")
    by_id = {p.id: p for p in preds}
    accs = {}
    for name, qs in sets.items():
        ps = [by_id[q.id] for q in qs]
        m = {**accuracy(ps), "model": model, "data": name, "scoring": label}
        write_results(d / name, m, ps)
        accs[name] = m["accuracy"]
    accs["pooled"] = accuracy(preds)["accuracy"]
    (d / "calibration.json").write_text(json.dumps({"accuracy": accs, **cal.to_dict(), **(extra or {})}, indent=2))
    return accs
