"""The evaluator on the tiny random Qwen3 and the packaged sample data (runs without ../shared/data)."""
from __future__ import annotations

import json

import pytest
import torch

from stemqa.config import load_config
from stemqa.data.mcq import MCQ, load_file
from stemqa.data.paths import SAMPLE_DATA
from stemqa.data.prompt import harness_prompt
from stemqa.eval.run import evaluate, evaluate_sets, evaluate_sets_remote, fewshot_for_records, load_scorer
from stemqa.eval.scorer import MCQScorer, cloze_prompt

MCQ_DIR = SAMPLE_DATA / "mcq"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    from stemqa.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model), load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def mixed_records() -> list[MCQ]:
    """4-option MMLU (two subjects), 5-option AQuA and 8-option QASC, of very different prompt lengths."""
    recs = load_file(MCQ_DIR / "mmlu/test/college_physics_test.csv", "mmlu_csv", limit=4)[0]
    recs += load_file(MCQ_DIR / "mmlu/test/high_school_biology_test.csv", "mmlu_csv", limit=3)[0]
    recs += load_file(MCQ_DIR / "aqua_rat/dev.json", "aqua_jsonl", limit=2)[0]
    recs += load_file(MCQ_DIR / "qasc/dev.jsonl", "arc_jsonl", limit=3)[0]
    assert {len(q.choices) for q in recs} == {4, 5, 8}
    return recs


def naive_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Unbatched, unpadded forward over context+continuation with full logits: the reference."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + k, t]) for k, t in enumerate(whole[len(ctx):]))


def test_letter_loglikelihoods_equal_naive_forward(model_and_tok, mixed_records):
    model, tok = model_and_tok
    prompts = [harness_prompt(q) for q in mixed_records]
    lens = [len(tok(p)["input_ids"]) for p in prompts]
    assert max(lens) > 2 * min(lens)  # batches really are padded
    batched = MCQScorer(model, tok, batch_size=5).letter_loglikelihoods(prompts, [len(q.choices) for q in mixed_records])
    for p, q, row in zip(prompts, mixed_records, batched):
        assert len(row) == len(q.choices)
        naive = [naive_loglikelihood(model, tok, p, f" {'ABCDEFGH'[j]}") for j in range(len(q.choices))]
        assert row == pytest.approx(naive, abs=1e-4), q.id


def test_cloze_scores_answer_texts_with_acc_norm(model_and_tok, mixed_records):
    model, tok = model_and_tok
    recs = mixed_records[:2] + mixed_records[-2:]
    preds = MCQScorer(model, tok, batch_size=3).score(recs, scoring="cloze")
    for q, p in zip(recs, preds):
        ctx = cloze_prompt(q)
        assert "\nA. " not in ctx and ctx.endswith(f"{q.question.strip()}\nAnswer:")
        naive = [naive_loglikelihood(model, tok, ctx, f" {c}") for c in q.choices]
        assert p.loglikelihoods == pytest.approx(naive, abs=1e-4)
        per_char = [ll / len(c) for ll, c in zip(naive, q.choices)]
        assert p.pred == "ABCDEFGH"[per_char.index(max(per_char))]  # acc_norm: by length-normalised ll


def test_kshot_cloze_runs_the_shared_prefix_once_and_equals_naive(model_and_tok, mixed_records):
    model, tok = model_and_tok
    shots = load_file(MCQ_DIR / "mmlu/dev/college_physics_dev.csv", "mmlu_csv", limit=3)[0]
    recs = mixed_records[:3] + mixed_records[-2:]
    scorer = MCQScorer(model, tok, batch_size=2)
    preds = scorer.score(recs, scoring="cloze_question", fewshot=shots)
    assert scorer._prefix is not None and len(scorer._prefix[0]) > 50  # the 3 examples came from the KV cache
    for q, p in zip(recs, preds):
        ctx = cloze_prompt(q, fewshot=shots, template="question")
        naive = [naive_loglikelihood(model, tok, ctx, f" {c}") for c in q.choices]
        assert p.loglikelihoods == pytest.approx(naive, abs=1e-4)


def test_fewshot_prompt_rendering():
    shots = [MCQ("d1", "college_physics", "What is 1+1? ", ["1", "2"], 1, "dev"),
             MCQ("d2", "college_physics", "Pick C", ["x", "y", "z"], 2, "dev")]
    q = MCQ("t1", "college_physics", "Which is heavier?", ["a kg of lead", "a kg of feathers"], 0, "test")
    assert harness_prompt(q, fewshot=shots) == (
        "The following are multiple choice questions (with answers) about college physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nAnswer: B\n\n"
        "Pick C\nA. x\nB. y\nC. z\nAnswer: C\n\n"
        "Which is heavier?\nA. a kg of lead\nB. a kg of feathers\nAnswer:")
    assert harness_prompt(q, header=False).startswith("Which is heavier?\nA. ")
    assert cloze_prompt(q, fewshot=shots[:1], header=False) == (
        "What is 1+1?\nAnswer: 2\n\nWhich is heavier?\nAnswer:")
    # per-subject k-shot: the subject's own examples, the pool's first k for a subject it lacks
    pool = {"college_physics": shots, "chemistry": [MCQ("c1", "chemistry", "H2O?", ["water", "salt"], 0, "dev")] * 2}
    other = MCQ("t2", "astronomy", "Sun?", ["star", "planet"], 0, "test")
    by_subject = fewshot_for_records([q, other], pool)
    assert by_subject["college_physics"] == shots
    assert len(by_subject["astronomy"]) == 2


def test_evaluate_writes_metrics_and_predictions(tiny_model, mixed_records, tmp_path):
    shots = load_file(MCQ_DIR / "mmlu/dev/college_physics_dev.csv", "mmlu_csv", limit=2)[0]
    fewshot = {"college_physics": shots}
    metrics = evaluate(tiny_model, mixed_records, tmp_path, batch_size=4, fewshot=fewshot, data_desc="mixed")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in lines] == [q.id for q in mixed_records]
    assert [p["gold"] for p in lines] == [q.answer_letter for q in mixed_records]
    for p, q in zip(lines, mixed_records):
        assert len(p["loglikelihoods"]) == len(q.choices)
        assert p["pred"] == "ABCDEFGH"[p["loglikelihoods"].index(max(p["loglikelihoods"]))]
    correct = [p["pred"] == p["gold"] for p in lines]
    assert metrics["n"] == len(mixed_records) and metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))
    subjects = {q.subject for q in mixed_records}
    assert set(metrics["per_subject"]) == subjects
    for s, m in metrics["per_subject"].items():
        mine = [c for c, q in zip(correct, mixed_records) if q.subject == s]
        assert m == {"accuracy": pytest.approx(sum(mine) / len(mine)), "n": len(mine)}
    assert metrics["model"] == tiny_model and metrics["data"] == "mixed" and metrics["num_fewshot"] == 2
    assert metrics["questions_per_s"] > 0 and metrics["scoring"] == "letter"
    # the k-shot examples changed the physics questions' scores and only theirs
    plain = load_scorer(tiny_model).score(mixed_records)
    for p, q, line in zip(plain, mixed_records, lines):
        changed = p.loglikelihoods != pytest.approx(line["loglikelihoods"], abs=1e-4)
        assert changed == (q.subject == "college_physics"), q.id


class ListRetriever:
    """Stands in for the RAG index (another stage): returns fixed passages with the Retriever interface."""

    def __init__(self):
        self.queries = []

    def search(self, queries, k):
        from stemqa.rag import Passage

        self.queries += queries
        return [[Passage(f"passage {i} " + "word " * 200, "test", 1.0) for i in range(k)] for _ in queries]


def _small_cfg(**eval_overrides):
    cfg = load_config("demo")
    cfg.eval.sets = [
        {"name": "mmlu", "sources": [{"path": "mcq/mmlu/test", "format": "mmlu_csv", "limit": 6,
                                      "subjects": ["college_physics", "high_school_biology"]}]},
        {"name": "qasc", "sources": [{"path": "mcq/qasc/dev.jsonl", "format": "arc_jsonl", "subject": "science",
                                      "limit": 4}]},
    ]
    for k, v in eval_overrides.items():
        setattr(cfg.eval, k, v)
    return cfg


def test_evaluate_sets_with_fewshot_and_rag(tiny_model, tmp_path):
    cfg = _small_cfg(num_fewshot=2, use_rag=True,
                     fewshot_source={"path": "mcq/mmlu/dev", "format": "mmlu_csv", "name": "mmlu_dev"})
    cfg.rag.top_k, cfg.rag.token_budget = 2, 64
    retriever = ListRetriever()
    results = evaluate_sets(tiny_model, cfg, SAMPLE_DATA, tmp_path, retriever=retriever, progress=False)
    assert set(results) == {"mmlu", "qasc"} and results["mmlu"]["n"] == 6 and results["qasc"]["n"] == 4
    assert results["mmlu"]["num_fewshot"] == 2 and results["mmlu"]["rag"] is True
    assert len(retriever.queries) == 10
    for name in results:
        assert json.loads((tmp_path / name / "metrics.json").read_text()) == results[name]
        assert len((tmp_path / name / "predictions.jsonl").read_text().splitlines()) == results[name]["n"]
    assert json.loads((tmp_path / "summary.json").read_text()) == results

    with pytest.raises(ValueError, match="use_rag"):
        evaluate_sets(tiny_model, cfg, SAMPLE_DATA, tmp_path, retriever=None)
    cfg.eval.use_rag, cfg.eval.fewshot_source = False, None
    with pytest.raises(ValueError, match="fewshot_source"):
        evaluate_sets(tiny_model, cfg, SAMPLE_DATA, tmp_path)


def test_evaluate_sets_in_a_fitted_mode(tiny_model, tmp_path):
    """eval.mode_params: the sets are scored in the fitted mode (here PriDe-debiased letters with a threshold),
    and the metrics say how often it was unsure and how well it did when sure."""
    from stemqa.eval.fit import fit_mode

    cfg = _small_cfg()
    dev = load_file(MCQ_DIR / "arc/ARC-Easy-train.jsonl", "arc_jsonl", limit=8)[0]
    params, _, _ = fit_mode(load_scorer(tiny_model), "letter_debiased", dev, model="tiny", fitted_on="8 ARC")
    path = params.save(tmp_path / "mode.json")
    cfg.eval.mode_params, cfg.eval.scoring = str(path), "letter_debiased"  # validated on assignment: params first
    results = evaluate_sets(tiny_model, cfg, SAMPLE_DATA, tmp_path / "out", progress=False)
    for name, m in results.items():
        assert m["scoring"] == "letter_debiased" and 0 <= m["unsure_share"] <= 1
        lines = [json.loads(x) for x in (tmp_path / "out" / name / "predictions.jsonl").read_text().splitlines()]
        assert all(p["mode"] == "letter_debiased" and p["unsure"] is not None for p in lines)
        assert m["unsure_share"] == pytest.approx(sum(p["unsure"] for p in lines) / len(lines))


def test_retrieved_passages_respect_token_budget(model_and_tok):
    from stemqa.eval.run import retrieve_passages

    _, tok = model_and_tok
    q = MCQ("q", "physics", "What is a photon?", ["a", "b"], 0, "t")
    texts = retrieve_passages(ListRetriever(), [q], k=3, token_budget=50, tokenizer=tok)[0]
    assert len(texts) == 1 and texts[0].startswith("passage 0")  # the first one already fills the budget
    # the budget counts the context block as the prompt renders it (passages_within_budget, as Serve cuts)
    from stemqa.data.prompt import passages_block

    assert 40 <= len(tok(passages_block(texts), add_special_tokens=False)["input_ids"]) <= 50


def test_evaluate_sets_as_ray_task(ray_local, tiny_model, tmp_path):
    import ray

    cfg = _small_cfg()
    local = evaluate_sets(tiny_model, cfg, SAMPLE_DATA, tmp_path / "local", progress=False)
    remote = ray.get(evaluate_sets_remote(tiny_model, cfg, SAMPLE_DATA, tmp_path / "ray"))
    for name in local:
        assert remote[name]["accuracy"] == local[name]["accuracy"] and remote[name]["n"] == local[name]["n"]
        assert (tmp_path / "ray" / name / "predictions.jsonl").read_text() == \
            (tmp_path / "local" / name / "predictions.jsonl").read_text()
