"""Choose what to serve: the best (model, answer mode) on the dev sets, never silently worse than the base model.

    cands = [load_candidate("base", "cloze_question", {"arc_easy_dev": dir1, ...}), ...]
    sel = select_best(cands)          # -> Selection (typed): chosen, base_best, every candidate's score, reason

Rules (issue 23): every candidate is scored on the pooled dev questions (Wilson 95% interval); the base model's
best mode on dev is the reference; each trained candidate gets the paired bootstrap difference against it on the
same questions. A trained candidate is eligible only when that difference's 95% interval is above 0
(`require_significant`, the default) -- a point estimate a resampling can flip is not "better". The best eligible
candidate is chosen; with none, the selection says so and chooses the base in its best mode.

Pure functions over predictions: no model is loaded here. A `select` stage reads the eval stage's
predictions.jsonl files with `load_candidate` and writes `Selection.to_dict()`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from stemqa.eval.modes import MODES
from stemqa.eval.scorer import Prediction
from stemqa.eval.stats import Accuracy, Difference, accuracy_of, paired_bootstrap, paired_outcomes

BASE = "base"


@dataclass(frozen=True)
class Candidate:
    """One model answering in one mode, with its predictions on each dev set."""

    model: str  # base, sft, dpo, quant (or any run tag)
    mode: str  # ModeParams.label(): letter, cloze, cloze_question, letter_debiased, permute
    predictions: Mapping[str, Sequence[Prediction]]  # dev set name -> predictions
    params_path: Optional[str] = None  # the fitted ModeParams JSON a scorer loads to answer this way

    def outcomes(self) -> dict[str, bool]:
        """Right or wrong per question, keyed by (set, question id)."""
        return {f"{s}/{p.id}": p.pred == p.gold for s, ps in self.predictions.items() for p in ps}


@dataclass(frozen=True)
class Scored:
    model: str
    mode: str
    accuracy: Accuracy  # pooled over the dev sets
    per_set: dict[str, Accuracy]
    vs_base: Optional[Difference]  # paired, against the base model in its best mode; None for that one itself
    params_path: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.model}/{self.mode}"

    def to_dict(self) -> dict:
        return {"model": self.model, "mode": self.mode, "params_path": self.params_path,
                "accuracy": _acc(self.accuracy), "per_set": {k: _acc(v) for k, v in self.per_set.items()},
                "vs_base": None if self.vs_base is None else {
                    "delta": self.vs_base.delta, "low": self.vs_base.low, "high": self.vs_base.high,
                    "n": self.vs_base.n}}


def _acc(a: Accuracy) -> dict:
    return {"value": a.value, "low": a.low, "high": a.high, "k": a.k, "n": a.n}


@dataclass(frozen=True)
class Selection:
    chosen: Scored
    base_best: Scored
    scores: list[Scored] = field(default_factory=list)  # every candidate, best first
    trained_beats_base: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.to_dict(), "base_best": self.base_best.to_dict(),
                "trained_beats_base": self.trained_beats_base, "reason": self.reason,
                "scores": [s.to_dict() for s in self.scores]}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _mode_order(mode: str) -> int:
    base = "cloze" if mode.startswith("cloze") else mode
    return MODES.index(base) if base in MODES else len(MODES)


def select_best(candidates: Sequence[Candidate], base: str = BASE, require_significant: bool = True,
                resamples: int = 10_000, seed: int = 0) -> Selection:
    """Score every candidate on dev, compare each trained one with the base's best mode, choose (module docstring)."""
    bases = [c for c in candidates if c.model == base]
    if not bases:
        raise ValueError(f"no candidate of the base model {base!r}: the selection compares against it")
    sets = set(bases[0].predictions)
    for c in candidates:
        if set(c.predictions) != sets:
            raise ValueError(f"{c.model}/{c.mode} was scored on dev sets {sorted(c.predictions)}, the base on "
                             f"{sorted(sets)}: candidates must share the dev questions")

    def score(c: Candidate, ref: Optional[dict[str, bool]]) -> Scored:
        out = c.outcomes()
        per_set = {s: accuracy_of([p.pred == p.gold for p in ps]) for s, ps in c.predictions.items()}
        diff = None
        if ref is not None:
            a, b = paired_outcomes(out, ref)
            diff = paired_bootstrap(a, b, resamples, seed)
        return Scored(c.model, c.mode, accuracy_of(list(out.values())), per_set, diff, c.params_path)

    # ties: the earlier mode in MODES order (the cheaper one: letter and cloze before permute)
    best_base = max(bases, key=lambda c: (accuracy_of(list(c.outcomes().values())).k, -_mode_order(c.mode)))
    ref = best_base.outcomes()
    base_scored = score(best_base, None)
    scored = [base_scored if c is best_base else score(c, ref) for c in candidates]
    trained = [s for s in scored if s.model != base]
    eligible = [s for s in trained if s.vs_base is not None
                and (s.vs_base.above_zero if require_significant else s.vs_base.delta > 0)]
    order = sorted(scored, key=lambda s: (-s.accuracy.value, _mode_order(s.mode)))
    if eligible:
        chosen = max(eligible, key=lambda s: (s.accuracy.k, -_mode_order(s.mode)))
        reason = (f"{chosen.name} beats the base model in its best mode ({base_scored.name}) on dev: "
                  f"{chosen.accuracy.fmt()} vs {base_scored.accuracy.fmt()}, paired difference "
                  f"{chosen.vs_base.fmt()}")
        return Selection(chosen, base_scored, order, True, reason)
    if trained:
        best = max(trained, key=lambda s: s.accuracy.k)
        why = "whose 95% interval is not above 0" if require_significant else "not above 0"
        reason = (f"no trained model beats the base on dev: the best, {best.name}, differs from {base_scored.name} "
                  f"by {best.vs_base.fmt()} ({why}); serving the base model in its best mode, {base_scored.name} "
                  f"({base_scored.accuracy.fmt()})")
    else:
        reason = f"only the base model was evaluated; serving it in its best mode, {base_scored.name}"
    return Selection(base_scored, base_scored, order, False, reason)


def read_predictions(path) -> list[Prediction]:
    """predictions.jsonl as written by stemqa.eval.run.write_results."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(Prediction.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a prediction: {e}") from None
    return out


def load_candidate(model: str, mode: str, set_dirs: Mapping[str, Path], params_path: Optional[str] = None) -> Candidate:
    """A candidate from eval output directories ({set name: dir holding predictions.jsonl})."""
    return Candidate(model, mode, {s: read_predictions(Path(d) / "predictions.jsonl") for s, d in set_dirs.items()},
                     params_path)
