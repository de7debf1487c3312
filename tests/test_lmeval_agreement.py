"""Our scorer agrees with lm-eval-harness 0.4.13 on the same model and questions (issue 2: >= 99% same predictions).

lm-eval cannot reach the hub here, so it runs a local task (stemqa.eval.lmeval_task) with MMLU's prompt over the
same records. The default test uses tiny-qwen3 (lm-eval's fixed start-up alone is ~1 min on this machine); the
real SmolLM2-135M-Instruct on 40 MMLU questions, with and without the subject header, is @slow.
"""
from __future__ import annotations

import pytest

from stemqa.data.mcq import MCQ, load_file
from stemqa.data.paths import SAMPLE_DATA
from stemqa.data.prompt import harness_prompt
from stemqa.eval.run import load_scorer

import lm_eval  # noqa: F401,E402  a test dependency: missing, it fails rather than skips


def mmlu_slice(root, per_subject: int, subjects=("college_physics", "high_school_chemistry", "high_school_biology",
                                                  "elementary_mathematics")) -> list[MCQ]:
    recs = []
    for s in subjects:
        path = root / "mcq" / "mmlu" / "test" / f"{s}_test.csv"
        if not path.exists():
            pytest.skip(f"{path} not found")
        recs += load_file(path, "mmlu_csv", limit=per_subject)[0]
    return recs


def mmlu_dev(root, records: list[MCQ], k: int) -> dict[str, list[MCQ]]:
    return {s: load_file(root / "mcq" / "mmlu" / "dev" / f"{s}_dev.csv", "mmlu_csv", limit=k)[0]
            for s in {q.subject for q in records}}


def check_agreement(model: str, records: list[MCQ], tmp_path, header: bool, ll_tol: float,
                    dev: dict[str, list[MCQ]] | None = None, k: int = 0) -> None:
    from stemqa.eval.lmeval_task import run_lmeval
    from stemqa.eval.run import score_records
    from stemqa.models import resolve_model

    theirs = run_lmeval(str(resolve_model(model)), records, tmp_path / "task", header=header, fewshot=dev,
                        num_fewshot=k)
    # lm-eval rendered exactly our harness prompt (k-shot: the subject's first k dev questions)
    assert theirs["contexts"] == [harness_prompt(q, fewshot=(dev or {}).get(q.subject, ())[:k], header=header)
                                  for q in records]
    scorer = load_scorer(model, batch_size=8)
    ours = score_records(scorer, records, fewshot={s: v[:k] for s, v in (dev or {}).items()}, header=header,
                         progress=False)
    if k:  # the shared k-shot prefix came from the KV cache, not a full pass per question
        assert scorer._prefix is not None and len(scorer._prefix[0]) > 100
    same = sum(p.pred == t for p, t in zip(ours, theirs["pred"]))
    assert same / len(records) >= 0.99, f"{same}/{len(records)} predictions agree"
    worst = max(abs(a - b) for p, row in zip(ours, theirs["loglikelihoods"]) for a, b in zip(p.loglikelihoods, row))
    assert worst <= ll_tol, f"largest log-likelihood difference {worst}"
    acc = sum(p.pred == p.gold for p in ours) / len(ours)
    assert acc == pytest.approx(theirs["accuracy"], abs=1.5 / len(records))


def test_agrees_with_lmeval_tiny(tiny_model, tmp_path):
    records = mmlu_slice(SAMPLE_DATA, per_subject=3)
    records += load_file(SAMPLE_DATA / "mcq/qasc/dev.jsonl", "arc_jsonl", limit=2)[0]  # 8 options
    check_agreement("tiny-qwen3", records, tmp_path, header=True, ll_tol=1e-3)


def test_agrees_with_lmeval_5shot_with_prefix_cache(tiny_model, tmp_path):
    records = mmlu_slice(SAMPLE_DATA, per_subject=3, subjects=("college_physics", "high_school_biology"))
    check_agreement("tiny-qwen3", records, tmp_path, header=True, ll_tol=1e-3, dev=mmlu_dev(SAMPLE_DATA, records, 5),
                    k=5)


@pytest.mark.slow
@pytest.mark.parametrize("header", [True, False])
def test_agrees_with_lmeval_smollm2(shared_data, smollm2, header, tmp_path):
    check_agreement("smollm2-135m-instruct", mmlu_slice(shared_data, per_subject=10), tmp_path, header=header,
                    ll_tol=1e-3)


def check_arc_cloze_agreement(model: str, records: list[MCQ], tmp_path, ll_tol: float) -> None:
    """cloze with the `question` template reproduces lm-eval's own arc_easy task item for item: the same contexts
    and continuations, log-likelihoods within ll_tol, and the same acc_norm prediction on every question."""
    from stemqa.eval.lmeval_task import run_lmeval
    from stemqa.eval.run import score_records
    from stemqa.eval.scorer import cloze_prompt
    from stemqa.models import resolve_model

    theirs = run_lmeval(str(resolve_model(model)), records, tmp_path / "task", task="arc")
    assert theirs["contexts"] == [cloze_prompt(q, template="question") for q in records]
    assert theirs["contexts"][0] == f"Question: {records[0].question}\nAnswer:"
    assert theirs["continuations"] == [[f" {c}" for c in q.choices] for q in records]
    ours = score_records(load_scorer(model, batch_size=8), records, scoring="cloze_question", progress=False)
    worst = max(abs(a - b) for p, row in zip(ours, theirs["loglikelihoods"]) for a, b in zip(p.loglikelihoods, row))
    assert worst <= ll_tol, f"largest log-likelihood difference {worst}"
    assert [p.pred for p in ours] == theirs["pred_norm"]  # every item, not a share
    # lm-eval's own per-question acc_norm agrees with ours
    assert [float(p.pred == p.gold) for p in ours] == theirs["acc_norm"]


def test_cloze_question_template_is_lmeval_arc_easy_tiny(tiny_model, tmp_path):
    records = load_file(SAMPLE_DATA / "mcq/arc/ARC-Easy-test.jsonl", "arc_jsonl", limit=12)[0]
    check_arc_cloze_agreement("tiny-qwen3", records, tmp_path, ll_tol=1e-3)


@pytest.mark.slow
def test_cloze_question_template_is_lmeval_arc_easy_smollm2(shared_data, smollm2, tmp_path):
    records = load_file(shared_data / "mcq/arc/ARC-Easy-test.jsonl", "arc_jsonl", limit=30)[0]
    records += load_file(shared_data / "mcq/arc/ARC-Challenge-dev.jsonl", "arc_jsonl", limit=20)[0]
    check_arc_cloze_agreement("smollm2-135m-instruct", records, tmp_path, ll_tol=1e-3)
