"""lm-eval-harness's `local-completions` model against the live Serve app, with a real model on real items.

SmolLM2-135M-Instruct served over HTTP, 20 MMLU STEM questions from the shared data; lm-eval 0.4.13 scores
them through /v1/completions (echo + logprobs, token ids from the model's own tokenizer, offline), and
`stemqa eval`'s scorer (stemqa.eval.run.score_records) scores them in-process. Both must give the same
per-option log-likelihoods (up to float noise), the same predicted letter per item and the same accuracy.
(tests/test_serve.py has the same check with the tiny random model on 6 items, in the default suite.)
Slow: deploying the model and 80 scored prompts take ~1-3 min on 2 shared CPUs.
"""
import os

import pytest

PORT = int(os.environ.get("STEMQA_TEST_SERVE_PORT", "8123"))
SUBJECTS = ["college_physics", "high_school_chemistry", "high_school_biology", "elementary_mathematics"]
PER_SUBJECT = 5
LL_TOLERANCE = 2e-3  # nats; the server pads a batch of 4 on the left, the evaluator sorts and batches its own


@pytest.fixture(scope="module")
def smollm2_url(ray_local, smollm2):
    from ray import serve

    from stemqa.stages.serve import deploy
    from stemqa.config import load_config

    cfg = load_config("demo", [f"serve.port={PORT}", "serve.autoscaling.min_replicas=1",
                               "serve.autoscaling.max_replicas=1", "serve.cpus_per_replica=1"])
    old = os.environ.pop(cfg.serve.api_key_env, None)  # no API key for this app
    try:
        yield deploy(cfg, smollm2, None)
    finally:
        serve.shutdown()
        if old is not None:
            os.environ[cfg.serve.api_key_env] = old


def mmlu_slice(shared_data):
    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_source

    records, _ = load_source(McqSource(path="mcq/mmlu/test", format="mmlu_csv", name="mmlu", subjects=SUBJECTS),
                             shared_data)
    return [q for s in SUBJECTS for q in [r for r in records if r.subject == s][:PER_SUBJECT]]


@pytest.mark.slow
def test_lm_eval_local_completions_on_mmlu_matches_stemqa_eval(smollm2_url, smollm2, shared_data, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from stemqa.eval.lmeval_task import write_lmeval_task
    from stemqa.eval.run import load_scorer, score_records
    from stemqa.eval.scorer import accuracy

    records = mmlu_slice(shared_data)
    assert len(records) == len(SUBJECTS) * PER_SUBJECT
    task = write_lmeval_task(records, tmp_path / "task")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], task_manager=TaskManager(include_path=str(tmp_path / "task")),
        model_args=f"model=smollm2,base_url={smollm2_url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={smollm2},tokenized_requests=True,num_concurrent=1,max_retries=1",
        batch_size=4, num_fewshot=0, log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    served_ll = [[float(r[0][0]) for r in s["resps"]] for s in samples]

    preds = score_records(load_scorer(smollm2), records, progress=False)
    assert len(samples) == len(preds) == len(records)
    for q, ll, p in zip(records, served_ll, preds):
        assert ll == pytest.approx(p.loglikelihoods, abs=LL_TOLERANCE), q.id
    served_pred = ["ABCD"[max(range(len(ll)), key=ll.__getitem__)] for ll in served_ll]
    assert served_pred == [p.pred for p in preds]
    ours = accuracy(preds)["accuracy"]
    assert out["results"][task]["acc,none"] == pytest.approx(ours)
    print(f"lm-eval local-completions vs stemqa eval on {len(records)} MMLU items: accuracy {ours:.3f} both, "
          f"{len(records)}/{len(records)} same predictions")
