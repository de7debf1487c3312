"""Answer modes of the one scorer: permute, PriDe debiasing, lm-eval's cloze template, fitted parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stemqa.config import ConfigError, load_config
from stemqa.data.mcq import MCQ, load_file
from stemqa.data.paths import SAMPLE_DATA
from stemqa.data.prompt import harness_prompt
from stemqa.eval.fit import fit_letter_prior, fit_mode
from stemqa.eval.modes import (ModeParams, as_params, cyclic_shifts, debias, log_softmax, params_from_config,
                               permuted_option_logprobs, position_prior, rotate)
from stemqa.eval.scorer import MCQScorer, cloze_prompt


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorer(tiny_model):
    from stemqa.models import load_causal_lm, load_tokenizer

    return MCQScorer(load_causal_lm(tiny_model), load_tokenizer(tiny_model), batch_size=4)


@pytest.fixture(scope="module")
def records():
    recs = load_file(SAMPLE_DATA / "mcq/arc/ARC-Easy-test.jsonl", "arc_jsonl", limit=6)[0]
    return recs + load_file(SAMPLE_DATA / "mcq/qasc/dev.jsonl", "arc_jsonl", limit=2)[0]  # 8 options


def simulated(content, bias, shifts):
    """What a model with option-text pull `content` and position pull `bias` gives per rotated prompt."""
    n = len(content)
    return [log_softmax([content[(j + s) % n] + bias[j] for j in range(n)]) for s in shifts]


def test_cyclic_shifts_and_rotation():
    assert cyclic_shifts(4) == [0, 1, 2, 3] and cyclic_shifts(8, 2) == [0, 4] and cyclic_shifts(3, 9) == [0, 1, 2]
    assert rotate(["a", "b", "c"], 1) == ["b", "c", "a"]


def test_pride_prior_recovers_the_position_bias_whatever_the_contents():
    rng = np.random.default_rng(0)
    bias = [1.2, 0.1, -0.3, -1.0]  # a model pulled towards "A"
    for _ in range(5):
        content = rng.normal(0, 2, 4).tolist()
        prior = position_prior(simulated(content, bias, cyclic_shifts(4)))
        assert prior == pytest.approx([math.exp(v) for v in log_softmax(bias)], abs=1e-9)


def test_permute_and_debias_undo_the_bias():
    bias, content = [3.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]  # option B is best, position A pulls hard
    rows = simulated(content, bias, [0])
    assert max(range(4), key=rows[0].__getitem__) == 0  # plain letter scoring answers A
    deb = debias(rows[0], [math.exp(v) for v in log_softmax(bias)])
    assert max(range(4), key=deb.__getitem__) == 1
    perm = permuted_option_logprobs(simulated(content, bias, cyclic_shifts(4)), cyclic_shifts(4))
    assert max(range(4), key=perm.__getitem__) == 1
    assert sum(math.exp(v) for v in perm) == pytest.approx(1)
    assert debias(rows[0], None) == rows[0]  # a number of options dev had none of: unchanged


def test_permute_mode_averages_rotated_prompts(scorer, records):
    q = records[0]
    preds = scorer.score([q], "permute")
    n = len(q.choices)
    probs = [0.0] * n
    for s in range(n):
        rq = MCQ(q.id, q.subject, q.question, rotate(q.choices, s), 0, q.source)
        row = log_softmax(scorer.letter_loglikelihoods([harness_prompt(rq)], [n])[0])
        for j in range(n):
            probs[(j + s) % n] += math.exp(row[j]) / n
    assert preds[0].scores == pytest.approx([math.log(p) for p in probs], abs=1e-5)
    assert preds[0].mode == "permute" and preds[0].pred == "ABCDEFGH"[probs.index(max(probs))]
    assert preds[0].loglikelihoods == pytest.approx(scorer.letter_loglikelihoods([harness_prompt(q)], [n])[0], abs=1e-5)
    # k < n: fewer forward passes, spread evenly
    assert len(scorer.position_logprobs([records[-1]], [{}], k=2)[0][0]) == 2


def test_letter_debiased_uses_the_fitted_prior(scorer, records):
    prior = fit_letter_prior(scorer, records)
    assert set(prior) == {len(q.choices) for q in records}
    assert all(sum(p) == pytest.approx(1) for p in prior.values())
    params = ModeParams(mode="letter_debiased", letter_prior=prior)
    for q, p in zip(records, scorer.score(records, params)):
        lls = scorer.letter_loglikelihoods([harness_prompt(q)], [len(q.choices)])[0]
        want = [lp - math.log(pr) for lp, pr in zip(log_softmax(lls), prior[len(q.choices)])]
        assert p.scores == pytest.approx(want, abs=1e-5)
        assert p.pred == "ABCDEFGH"[want.index(max(want))]


def test_cloze_question_template(scorer, records):
    q = records[0]
    assert cloze_prompt(q, template="question") == f"Question: {q.question}\nAnswer:"
    assert cloze_prompt(q, fewshot=[records[1]], template="question") == (
        f"Question: {records[1].question}\nAnswer: {records[1].choices[records[1].answer]}\n\n"
        f"Question: {q.question}\nAnswer:")
    p = scorer.score([q], "cloze_question")[0]
    assert p.mode == "cloze_question"
    assert p.scores == pytest.approx([ll / len(c) for ll, c in zip(p.loglikelihoods, q.choices)], abs=1e-5)
    with pytest.raises(ValueError, match="template"):
        cloze_prompt(q, template="chat")


def test_fitted_params_round_trip_and_unsure_flag(scorer, records, tmp_path):
    params, cal, preds = fit_mode(scorer, "letter", records, model="tiny", fitted_on="sample")
    assert params.temperature == pytest.approx(cal.temperature) and params.unsure_below is not None
    path = params.save(tmp_path / "mode.json")
    loaded = ModeParams.load(path)
    assert loaded == params
    scored = scorer.score(records, loaded)
    for p in scored:
        assert p.unsure == (max(p.probabilities) < loaded.unsure_below)
        assert max(p.probabilities) == pytest.approx(p.probabilities["ABCDEFGH".index(p.pred)])
    # the temperature changes probabilities, never the answer
    assert [p.pred for p in scored] == [p.pred for p in preds]


def test_bad_mode_params_and_config_are_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"mode": "letter_debiased"}')
    with pytest.raises(ValueError, match="needs a letter_prior"):
        ModeParams.load(bad)
    bad.write_text('{"mode": "letter", "letter_prior": {"4": [0.5, 0.5]}}')
    with pytest.raises(ValueError, match=r"letter_prior\[4\]"):
        ModeParams.load(bad)
    with pytest.raises(FileNotFoundError, match="no such mode parameters"):
        ModeParams.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="scoring must be one of"):
        as_params("letters")
    with pytest.raises(ValueError, match="needs fitted mode parameters"):
        as_params("letter_debiased")
    with pytest.raises(ConfigError, match="mode_params"):
        load_config("demo", ["eval.scoring=letter_debiased"])
    ModeParams(mode="cloze").save(tmp_path / "cloze.json")
    cfg = load_config("demo", ["eval.scoring=letter", f"eval.mode_params={tmp_path / 'cloze.json'}"])
    with pytest.raises(ValueError, match="fitted for mode 'cloze'"):
        params_from_config(cfg.eval)
    cfg = load_config("demo", ["eval.scoring=cloze", "eval.cloze_template=question"])
    assert params_from_config(cfg.eval).label() == "cloze_question"


def test_rescoring_from_saved_loglikelihoods_equals_scoring(scorer, records):
    from stemqa.eval.fit import fit_from_predictions, rescored

    choices = [q.choices for q in records]
    cloze = scorer.score(records, "cloze_question")
    acc = rescored(cloze, as_params("cloze_question_acc"), choices)
    direct = scorer.score(records, "cloze_question_acc")
    assert [p.pred for p in acc] == [p.pred for p in direct] and acc[0].mode == "cloze_question_acc"
    assert acc[0].scores == pytest.approx(direct[0].scores, abs=1e-5)
    assert acc[0].scores == pytest.approx(cloze[0].loglikelihoods, abs=1e-6)  # acc: the plain sums
    prior = fit_letter_prior(scorer, records[:4])
    params = ModeParams(mode="letter_debiased", letter_prior=prior)
    deb = rescored(scorer.score(records, "letter"), params, choices)
    assert [p.scores for p in deb] == [pytest.approx(p.scores, abs=1e-5) for p in scorer.score(records, params)]
    fitted, cal, out = fit_from_predictions(params, deb)
    assert fitted.letter_prior == prior and fitted.temperature == pytest.approx(cal.temperature)
    assert all(p.unsure is not None for p in out)
    with pytest.raises(ValueError, match="own forward passes"):
        rescored(deb, ModeParams(mode="permute"), choices)
