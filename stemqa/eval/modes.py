"""Answer modes of the one scorer, and the parameters a mode is fitted with on dev data (`ModeParams`).

    letter           log p(" A" | harness prompt), ... (lm-eval's MMLU scoring)
    cloze            each answer text's log-likelihood after the question, divided by its length in characters
                     (lm-eval's acc_norm; `cloze_norm: none` = the plain sum, lm-eval's acc, labelled `_acc`);
                     `cloze_template` picks the context:
                       header   stemqa's: subject header, question, "Answer:"
                       question lm-eval's arc_easy / arc_challenge / sciq / openbookqa: "Question: <q>\\nAnswer:"
    letter_debiased  letter, with the model's prior over option *positions* removed (PriDe: Zheng et al., "Large
                     Language Models Are Not Robust Multiple Choice Selectors", ICLR 2024). The prior is estimated
                     without labels on dev questions from cyclic permutations of their options (`cyclic_shifts`):
                     averaged over the permutations every option text visits every position, so what the mean
                     log-probability of a position keeps is the position's own pull. Scores: log p(letter) - log prior.
    permute          each option's letter probability averaged over `permute_k` cyclic permutations of the options
                     (k forward passes per question; all n by default).

Every mode ends in one score per option; probabilities are softmax(score / temperature), so the top probability
always belongs to the predicted option. The temperature, the letter prior and the "unsure" threshold are fitted
on dev data (stemqa.eval.calibration, stemqa.eval.fit) and saved as JSON (`ModeParams.save`); a scorer (stemqa
eval, /v1/mcqa) loads that file to answer in the fitted mode.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Mode = Literal["letter", "cloze", "letter_debiased", "permute"]
MODES: tuple[str, ...] = ("letter", "cloze", "letter_debiased", "permute")
ClozeTemplate = Literal["header", "question"]


class ModeParams(BaseModel):
    """How to answer: the mode and what was fitted for it on dev data. JSON on disk (`save` / `load`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "letter"
    cloze_template: ClozeTemplate = Field("header", description="cloze context (see the module docstring)")
    cloze_norm: Literal["chars", "none"] = Field(
        "chars", description="cloze: divide each option's log-likelihood by its length in characters (acc_norm) or not")
    permute_k: Optional[int] = Field(None, ge=1, description="permute: permutations per question; None = all n")
    letter_prior: dict[int, list[float]] = Field(
        default_factory=dict, description="letter_debiased: prior over option positions, per number of options")
    temperature: float = Field(1.0, gt=0, description="probabilities = softmax(score / temperature)")
    unsure_below: Optional[float] = Field(
        None, ge=0, le=1, description="a calibrated top probability below this is answered as 'unsure'")
    accuracy_when_unsure: Optional[float] = Field(None, description="dev accuracy of the questions under the threshold")
    accuracy_when_sure: Optional[float] = Field(None, description="dev accuracy of the questions at or over it")
    model: str = Field("", description="the model these parameters were fitted for")
    fitted_on: str = Field("", description="the dev data they were fitted on")

    @model_validator(mode="after")
    def _check(self):
        for n, prior in self.letter_prior.items():
            if len(prior) != n or any(p <= 0 for p in prior) or abs(sum(prior) - 1) > 1e-3:
                raise ValueError(f"letter_prior[{n}] must be {n} positive probabilities summing to 1, got {prior}")
        if self.mode == "letter_debiased" and not self.letter_prior:
            raise ValueError("mode letter_debiased needs a letter_prior (fit it on dev: stemqa.eval.fit.fit_letter_prior)")
        return self

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path) -> "ModeParams":
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such mode parameters file") from None
        except (json.JSONDecodeError, ValidationError) as e:
            raise ValueError(f"{path}: not valid mode parameters: {e}") from None

    def label(self) -> str:
        """Short name for tables: the mode, with the cloze template when it is not the default."""
        if self.mode == "cloze":
            return "cloze" + ("" if self.cloze_template == "header" else f"_{self.cloze_template}") + \
                ("_acc" if self.cloze_norm == "none" else "")
        if self.mode == "permute" and self.permute_k:
            return f"permute{self.permute_k}"
        return self.mode


def as_params(scoring: Union[str, ModeParams]) -> ModeParams:
    """A mode name, a cloze label (cloze_question, cloze_acc, cloze_question_acc) or ModeParams -> ModeParams."""
    if isinstance(scoring, ModeParams):
        return scoring
    if scoring.startswith("cloze_") and scoring in CLOZE_LABELS:
        return CLOZE_LABELS[scoring]
    if scoring not in MODES:
        raise ValueError(f"scoring must be one of {', '.join(MODES + tuple(CLOZE_LABELS))}, got {scoring!r}")
    if scoring == "letter_debiased":
        raise ValueError("scoring 'letter_debiased' needs fitted mode parameters with a letter prior "
                         "(eval.mode_params, from stemqa.eval.fit.fit_mode)")
    return ModeParams(mode=scoring)


CLOZE_LABELS = {p.label(): p for p in (ModeParams(mode="cloze", cloze_template=t, cloze_norm=n)
                                        for t in ("header", "question") for n in ("chars", "none"))
                if p.label() != "cloze"}


# --- pure transforms of per-option scores -----------------------------------------------------------------------
def log_softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def softmax(xs: Sequence[float], temperature: float = 1.0) -> list[float]:
    return [math.exp(v) for v in log_softmax([x / temperature for x in xs])]


def cloze_scores(lls: Sequence[float], choices: Sequence[str], norm: str = "chars") -> list[float]:
    """acc_norm (lm-eval: log-likelihood / length of the option text in characters) or the plain sum (acc)."""
    return [ll / max(len(c), 1) for ll, c in zip(lls, choices)] if norm == "chars" else list(lls)


def cyclic_shifts(n: int, k: Optional[int] = None) -> list[int]:
    """The shifts of k cyclic permutations of n options, spread evenly (all n when k is None or >= n)."""
    k = n if k is None or k >= n else k
    return sorted({(i * n) // k for i in range(k)})


def rotate(choices: Sequence, shift: int) -> list:
    """Position j shows option (j + shift) mod n."""
    n = len(choices)
    return [choices[(j + shift) % n] for j in range(n)]


def permuted_option_logprobs(position_logprobs: Sequence[Sequence[float]], shifts: Sequence[int]) -> list[float]:
    """Per original option, log of its letter probability averaged over the permutations.
    `position_logprobs[s][j]`: log-softmax over the letters of the prompt rotated by shifts[s], at position j."""
    n = len(position_logprobs[0])
    avg = [0.0] * n
    for row, s in zip(position_logprobs, shifts):
        for j, lp in enumerate(row):
            avg[(j + s) % n] += math.exp(lp) / len(shifts)
    return [math.log(max(p, 1e-300)) for p in avg]


def position_prior(position_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """PriDe's prior of one question: softmax over positions of the mean log-probability of each position
    across the (cyclic) permutations; the option texts' own pull averages out."""
    n, k = len(position_logprobs[0]), len(position_logprobs)
    mean = [sum(row[j] for row in position_logprobs) / k for j in range(n)]
    return softmax(mean)


def debias(letter_logprobs: Sequence[float], prior: Optional[Sequence[float]]) -> list[float]:
    """log p(letter) - log prior(position); no prior (a number of options dev had none of): unchanged."""
    if prior is None:
        return list(letter_logprobs)
    return [lp - math.log(p) for lp, p in zip(letter_logprobs, prior)]


def params_from_config(ev) -> ModeParams:
    """The answer mode an `EvalConfig` asks for: its fitted `mode_params` file when set, else the bare mode."""
    if ev.mode_params:
        params = ModeParams.load(ev.mode_params)
        if params.mode != ev.scoring:
            raise ValueError(f"eval.mode_params {ev.mode_params} was fitted for mode {params.mode!r}, but "
                             f"eval.scoring is {ev.scoring!r}")
        return params
    return ModeParams(mode=ev.scoring, cloze_template=ev.cloze_template, permute_k=ev.permute_k)
