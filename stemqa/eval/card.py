"""The model card: what is served and why, every set x mode x model with 95% intervals, the deltas against the base
model in its best mode, the letter-bias table, calibration, and the data each model was trained on.

    md = render_model_card(CardInputs(...))      # markdown
    write_model_card(path, inputs)                # runs/<id>/model_card.md (report.html can embed the markdown)

Pure: it formats predictions, a `Selection` and `Calibration`s; it computes intervals itself (stemqa.eval.stats)
so every figure on the card comes with its n.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from stemqa.data.mcq import LETTERS
from stemqa.eval.calibration import Calibration
from stemqa.eval.scorer import Prediction
from stemqa.eval.select import Selection
from stemqa.eval.stats import accuracy_of, paired_bootstrap, paired_outcomes

Key = tuple[str, str]  # (model, mode)


@dataclass
class CardInputs:
    title: str
    selection: Selection
    results: Mapping[Key, Mapping[str, Sequence[Prediction]]]  # (model, mode) -> set name -> predictions
    set_parts: Mapping[str, str]  # set name -> "dev" or "report"
    set_notes: Mapping[str, str] = field(default_factory=dict)  # e.g. "the selection set"
    calibration: Mapping[Key, Calibration] = field(default_factory=dict)
    training_data: Mapping[str, Sequence[str]] = field(default_factory=dict)  # model -> what it was trained on
    notes: Sequence[str] = ()


def _fmt_acc(preds: Sequence[Prediction]) -> str:
    a = accuracy_of([p.pred == p.gold for p in preds])
    return f"{a.value:.3f} [{a.low:.3f}, {a.high:.3f}]"


def _delta(preds: Sequence[Prediction], ref: Optional[Sequence[Prediction]], seed: int = 0) -> str:
    if ref is None:
        return "-"
    a, b = paired_outcomes({p.id: p.pred == p.gold for p in preds}, {p.id: p.pred == p.gold for p in ref})
    d = paired_bootstrap(a, b, seed=seed)
    mark = " *" if d.above_zero else (" (worse)" if d.high < 0 else "")
    return f"{d.fmt()}{mark}"


def letter_bias(preds: Sequence[Prediction]) -> tuple[dict[str, float], dict[str, float]]:
    """(share of each predicted letter, share of each gold letter)."""
    n = len(preds)
    pred, gold = Counter(p.pred for p in preds), Counter(p.gold for p in preds)
    letters = sorted(set(pred) | set(gold), key=LETTERS.index)
    return {x: pred[x] / n for x in letters}, {x: gold[x] / n for x in letters}


def accuracy_table(inp: CardInputs) -> list[str]:
    base_key = (inp.selection.base_best.model, inp.selection.base_best.mode)
    sets = list(dict.fromkeys(s for r in inp.results.values() for s in r))
    lines = []
    for part in ("dev", "report"):
        names = [s for s in sets if inp.set_parts.get(s) == part]
        if not names:
            continue
        title = "Dev sets (used to choose the model and mode, and to fit temperatures)" if part == "dev" else \
            "Report sets (never trained on, never used for a choice)"
        lines += [f"### {title}", ""]
        for s in names:
            note = f" ({inp.set_notes[s]})" if s in inp.set_notes else ""
            ref = inp.results.get(base_key, {}).get(s)
            n = next(len(r[s]) for r in inp.results.values() if s in r)
            lines += [f"**{s}**{note}, n={n}", "",
                      f"| model | mode | accuracy [95% CI] | vs base in its best mode ({base_key[1]}) [paired 95% CI] |",
                      "|---|---|---|---|"]
            for (model, mode), r in inp.results.items():
                if s in r:
                    delta = "reference" if (model, mode) == base_key else _delta(r[s], ref)
                    lines.append(f"| {model} | {mode} | {_fmt_acc(r[s])} | {delta} |")
            lines.append("")
    lines += ["`*`: the paired 95% interval of the difference is above 0.", ""]
    return lines


def bias_table(inp: CardInputs) -> list[str]:
    lines = ["| model | mode | set | predicted letters | gold letters |", "|---|---|---|---|---|"]
    for (model, mode), r in inp.results.items():
        for s, preds in r.items():
            pred, gold = letter_bias(preds)
            lines.append(f"| {model} | {mode} | {s} | " + " ".join(f"{k} {v:.0%}" for k, v in pred.items())
                         + " | " + " ".join(f"{k} {v:.0%}" for k, v in gold.items()) + " |")
    return lines + [""]


def calibration_table(inp: CardInputs) -> list[str]:
    if not inp.calibration:
        return ["No calibration was fitted.", ""]
    lines = ["| model | mode | n dev | temperature | ECE before | ECE after | unsure below | answered | "
             "accuracy when sure | accuracy when unsure |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, mode), c in inp.calibration.items():
        t = c.threshold
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {model} | {mode} | {c.n} | {c.temperature:.3f} | {c.ece_before:.3f} | {c.ece_after:.3f} | "
                     f"{t.unsure_below:.3f} | {t.coverage:.0%} | {fmt(t.accuracy_when_sure)} | "
                     f"{fmt(t.accuracy_when_unsure)} |")
    return lines + ["", "ECE: expected calibration error of the top probability, 15 equal-width bins. The threshold "
                        "maximises (right answers given) - (wrong answers given) on dev; under it the assistant says "
                        "it is unsure, and 'accuracy when unsure' is how often its top option was right there.", ""]


def render_model_card(inp: CardInputs) -> str:
    sel = inp.selection
    chosen = sel.chosen
    lines = [f"# Model card: {inp.title}", "", "## What is served", "",
             f"**{chosen.model}** answering in mode **{chosen.mode}** (dev accuracy {chosen.accuracy.fmt()}).", "",
             sel.reason + ".", ""]
    if not sel.trained_beats_base:
        lines += ["**No trained model beat the base model on dev: the base model is served.**", ""]
    lines += ["## Dev selection", "", "| model | mode | dev accuracy [95% CI] | vs base best [paired 95% CI] |",
              "|---|---|---|---|"]
    for s in sel.scores:
        lines.append(f"| {s.model} | {s.mode} | {s.accuracy.fmt()} | "
                     f"{'reference' if s.vs_base is None else s.vs_base.fmt()} |")
    lines += ["", "## Accuracy by set", ""] + accuracy_table(inp)
    lines += ["## Letter bias", "", "Share of each predicted option letter against the share of each gold letter: "
              "a model that mostly answers one letter shows it here.", ""] + bias_table(inp)
    lines += ["## Calibration", ""] + calibration_table(inp)
    lines += ["## Training data", ""]
    for model, data in inp.training_data.items():
        lines.append(f"- **{model}**: " + ("; ".join(data) if data else "not trained (the base model)"))
    lines.append("")
    if inp.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in inp.notes] + [""]
    return "\n".join(lines)


def write_model_card(path, inp: CardInputs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(inp), encoding="utf-8")
    return path
