"""Choosing what to serve on dev, and the model card: pure functions over predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stemqa.eval.calibration import calibrate
from stemqa.eval.card import CardInputs, letter_bias, render_model_card, write_model_card
from stemqa.eval.run import write_results
from stemqa.eval.scorer import Prediction
from stemqa.eval.select import Candidate, load_candidate, read_predictions, select_best

SETS = {"arc_easy_dev": 300, "mmlu_stem_dev": 200}


def preds(acc: float, seed: int, n: int, always: str | None = None, base=None, gain: int = 0,
          loss: int = 0) -> list[Prediction]:
    """n 4-option predictions right with probability acc; or `base`'s with `gain` wrong answers made right and
    `loss` right ones made wrong."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(list("ABCD"), n)
    if base is not None:
        out, flipped, lost = [], 0, 0
        for p in base:
            right = p.pred == p.gold
            if not right and flipped < gain:
                right, flipped = True, flipped + 1
            elif right and lost < loss:
                right, lost = False, lost + 1
            out.append(Prediction(p.id, p.subject, p.gold, p.gold if right else ("A" if p.gold != "A" else "B"),
                                  [0.0] * 4, [0.25] * 4))
        return out
    out = []
    for i, g in enumerate(gold):
        right = rng.random() < acc
        pred = g if right else (always or rng.choice([x for x in "ABCD" if x != g]))
        out.append(Prediction(f"q{i}", "s", g, pred, [0.0] * 4, [0.25] * 4))
    return out


def cand(model, mode, per_set):
    return Candidate(model, mode, per_set)


@pytest.fixture(scope="module")
def base_sets():
    return {"letter": {s: preds(0.26, 1 + i, n, always="A") for i, (s, n) in enumerate(SETS.items())},
            "cloze": {s: preds(0.45, 11 + i, n) for i, (s, n) in enumerate(SETS.items())}}


def test_selects_a_trained_model_only_when_it_beats_the_best_base_mode(base_sets):
    better = {s: preds(0, 0, 0, base=ps, gain=25) for s, ps in base_sets["cloze"].items()}  # +50 of 500
    cands = [cand("base", "letter", base_sets["letter"]), cand("base", "cloze", base_sets["cloze"]),
             cand("sft", "cloze", better), cand("sft", "letter", base_sets["letter"])]
    sel = select_best(cands)
    assert sel.base_best.mode == "cloze"  # base in its best mode is the reference, not base/letter
    assert sel.trained_beats_base and (sel.chosen.model, sel.chosen.mode) == ("sft", "cloze")
    assert sel.chosen.vs_base.delta == pytest.approx(0.1) and sel.chosen.vs_base.low > 0
    assert "beats the base model in its best mode (base/cloze)" in sel.reason
    assert sel.scores[0].name == "sft/cloze"
    assert json.loads(json.dumps(sel.to_dict()))["chosen"]["mode"] == "cloze"


def test_no_trained_model_beats_base_selects_base_and_says_so(base_sets):
    # +6 of 500, from 24 questions gained and 18 lost: within resampling noise
    slightly = {s: preds(0, 0, 0, base=ps, gain=12, loss=9) for s, ps in base_sets["cloze"].items()}
    worse = base_sets["letter"]
    sel = select_best([cand("base", "letter", base_sets["letter"]), cand("base", "cloze", base_sets["cloze"]),
                       cand("sft", "cloze", slightly), cand("dpo", "letter", worse)])
    assert not sel.trained_beats_base
    assert (sel.chosen.model, sel.chosen.mode) == ("base", "cloze")  # never silently the "better" point estimate
    assert "no trained model beats the base on dev" in sel.reason and "sft/cloze" in sel.reason
    # without the significance requirement the point estimate wins
    loose = select_best([cand("base", "cloze", base_sets["cloze"]), cand("sft", "cloze", slightly)],
                        require_significant=False)
    assert loose.chosen.model == "sft"


def test_candidates_must_share_dev_questions(base_sets):
    other = {"arc_easy_dev": base_sets["cloze"]["arc_easy_dev"]}
    with pytest.raises(ValueError, match="must share the dev questions"):
        select_best([cand("base", "cloze", base_sets["cloze"]), cand("sft", "cloze", other)])
    with pytest.raises(ValueError, match="no candidate of the base model"):
        select_best([cand("sft", "cloze", base_sets["cloze"])])


def test_candidates_from_eval_directories(base_sets, tmp_path):
    dirs = {}
    for s, ps in base_sets["cloze"].items():
        write_results(tmp_path / s, {"accuracy": 0}, ps)
        dirs[s] = tmp_path / s
    c = load_candidate("base", "cloze", dirs)
    assert c.predictions["mmlu_stem_dev"] == base_sets["cloze"]["mmlu_stem_dev"]
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a prediction"):
        read_predictions(tmp_path / "bad.jsonl")


def test_model_card(base_sets, tmp_path):
    better = {s: preds(0, 0, 0, base=ps, gain=25) for s, ps in base_sets["cloze"].items()}
    sel = select_best([cand("base", "letter", base_sets["letter"]), cand("base", "cloze", base_sets["cloze"]),
                       cand("sft", "cloze", better)])
    report = {"arc_easy_test": preds(0.45, 99, 400)}
    report_sft = {"arc_easy_test": preds(0, 0, 0, base=report["arc_easy_test"], gain=40)}
    rng = np.random.default_rng(0)
    scores = [rng.normal(0, 1, 4).tolist() for _ in range(200)]
    gold = [int(rng.integers(4)) for _ in range(200)]
    inp = CardInputs(
        title="study", selection=sel,
        results={("base", "letter"): base_sets["letter"], ("base", "cloze"): {**base_sets["cloze"], **report},
                 ("sft", "cloze"): {**better, **report_sft}},
        set_parts={"arc_easy_dev": "dev", "mmlu_stem_dev": "dev", "arc_easy_test": "report"},
        set_notes={"arc_easy_dev": "selection set"},
        calibration={("sft", "cloze"): calibrate(scores, gold)},
        training_data={"base": [], "sft": ["QA-SFT on 10,747 training-side MCQs (ARC, AI2, QASC, MMLU)"]})
    md = render_model_card(inp)
    assert "**sft** answering in mode **cloze**" in md
    assert "### Report sets (never trained on, never used for a choice)" in md
    assert "**arc_easy_test**, n=400" in md and "**arc_easy_dev** (selection set), n=300" in md
    assert "+0.100 [" in md and " *" in md  # report delta vs base/cloze with its paired CI, marked above 0
    assert "| base | letter | arc_easy_dev | A " in md  # the letter-bias row of the always-"A" base
    assert "not trained (the base model)" in md and "QA-SFT on 10,747" in md
    assert "ECE" in md and "unsure below" in md
    pred, gold_share = letter_bias(base_sets["letter"]["arc_easy_dev"])
    assert pred["A"] > 0.7 and gold_share["A"] < 0.4
    path = write_model_card(tmp_path / "run" / "model_card.md", inp)
    assert path.read_text() == md
    # when nothing beats the base, the card says it in bold
    sel_base = select_best([cand("base", "cloze", base_sets["cloze"]), cand("sft", "letter", base_sets["letter"])])
    md2 = render_model_card(CardInputs("study", sel_base, {("base", "cloze"): base_sets["cloze"]},
                                       {"arc_easy_dev": "dev", "mmlu_stem_dev": "dev"}))
    assert "**No trained model beat the base model on dev: the base model is served.**" in md2
