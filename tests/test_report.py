"""The HTML report of a run, opened in real headless Chromium: every figure renders, the tables hold the run's
numbers. The run directories are built from real computations: SFT steps of tiny-qwen3 (grad_accum 1 vs 4),
stemqa's DPO loss, a real int8 quantization, real evaluation, real retrieval recall, the real filter histogram."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_tracking import SAMPLE, real_dpo_evals, real_sft_losses, sample_records

from stemqa.runs import Run
from stemqa.tracking import TrackingConfig, log_stage
from stemqa.train.history import TrainHistory

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"


class WordOverlapRetriever:
    """A real (if simple) retriever over QASC facts for `fact_recall_at_k`: most shared words first."""

    def __init__(self, facts: list[str]):
        self.facts = facts

    def search(self, queries: list[str], k: int):
        from types import SimpleNamespace

        def words(t):
            return set(re.findall(r"[a-z]+", t.lower()))
        return [[SimpleNamespace(text=f) for f in sorted(self.facts, key=lambda f: -len(words(f) & words(q)))[:k]]
                for q in queries]


def _sft_stage(run: Run, model_path: str, grad_accum: int, tracking: TrackingConfig):
    losses = real_sft_losses(model_path, grad_accum=grad_accum, steps=4)
    cfg = {"lr": 1e-3, "batch_size": 2, "grad_accum": grad_accum}
    history = TrainHistory.of(losses)
    with run.stage("sft", inputs={"train": "filter/kept.jsonl", "base_model": "tiny-qwen3"}, config=cfg) as rec:
        shutil.copytree(model_path, rec.dir / "model")
        rec.add_artifact("model", rec.dir / "model")
        rec.add_artifact("history", history.write(rec.dir / "history.jsonl"))
        rec.add_metrics(train_loss_first=losses[0], train_loss_last=losses[-1], steps=len(losses))
    log_stage(run, "sft", run.manifest()["stages"]["sft"]["metrics"], tracking, cfg, history=history)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    from stemqa.config.schema import QuantConfig
    from stemqa.data.mcq import load_file
    from stemqa.eval.run import evaluate
    from stemqa.filter.plot import score_histogram
    from stemqa.quant import quantize
    from stemqa.rag.evaluate import fact_recall_at_k, load_qasc_gold

    storage = tmp_path_factory.mktemp("runs")
    tracking = TrackingConfig(backends=[])  # the report reads the run directory only
    main = Run.create(str(storage), "demo", {"name": "demo"}, run_id="demo-ga1")
    other = Run.create(str(storage), "demo", {"name": "demo"}, run_id="demo-ga4")

    records = sample_records(16)
    with main.stage("filter") as rec:
        scores = np.random.default_rng(0).beta(5, 2, size=200)
        rec.add_artifact("histogram", score_histogram({"mmlu": scores}, 0.7, "cut-off", rec.dir / "scores_hist.png"))
        rec.add_metrics(kept=int((scores > 0.7).sum()), total=len(scores))
    _sft_stage(main, tiny_model, 1, tracking)
    _sft_stage(other, tiny_model, 4, tracking)

    evals = real_dpo_evals(steps=(0, 2, 4, 6))
    with main.stage("dpo", inputs={"base_model": "sft/model"}, config={"beta": 0.1}) as rec:
        shutil.copytree(tiny_model, rec.dir / "model")
        rec.add_artifact("model", rec.dir / "model")
        history = TrainHistory.of([e["loss"] for e in evals[1:] for _ in (0, 1)], evals)
        rec.add_artifact("history", history.write(rec.dir / "history.jsonl"))
        rec.add_metrics(val_reward_accuracy_best=max(e["reward_accuracy"] for e in evals))
    with main.stage("quant", inputs={"model": "dpo/model"}) as rec:
        res = quantize(QuantConfig(method="int8-weight", group_size=16, calibration_samples=2),
                       str(main.artifact("dpo", "model")), records, rec.dir / "model")
        rec.add_artifact("model", res["model_dir"])
        rec.add_metrics(**{k: v for k, v in res.items() if k != "model_dir"})

    gold = load_qasc_gold(SAMPLE / "mcq/qasc/dev.jsonl", limit=30)
    with main.stage("rag") as rec:
        facts = sorted({f for _, fs in gold for f in fs})
        rec.add_metrics(chunks=len(facts), **fact_recall_at_k(WordOverlapRetriever(facts), gold, 5))

    mmlu = []
    for f in sorted((SAMPLE / "mcq/mmlu/dev").glob("*.csv"))[:3]:
        mmlu += load_file(f, "mmlu_csv")[0]
    with main.stage("eval", inputs={"models": ["dpo", "quant"]}) as rec:
        for name in ("dpo", "quant"):
            m = evaluate(str(main.artifact(name, "model")), mmlu, rec.dir / name / "mmlu", progress=False)
            rec.add_artifact(name, rec.dir / name)
            rec.add_metrics(**{f"{name}/mmlu": m["accuracy"]})
    # the select stage's model card, made by the library from these predictions (dpo as the reference model)
    from stemqa.eval.card import CardInputs, write_model_card
    from stemqa.eval.select import load_candidate, select_best

    cands = [load_candidate(label, "letter", {"mmlu": main.path / "eval" / name / "mmlu"})
             for label, name in (("base", "dpo"), ("quant", "quant"))]
    sel = select_best(cands)
    with main.stage("select") as rec:
        card = write_model_card(main.path / "model_card.md", CardInputs(
            "report test", sel, {(c.model, c.mode): c.predictions for c in cands}, {"mmlu": "report"}))
        rec.add_artifact("model_card", card)
    return main, other


def test_report_renders_in_chromium(runs):
    from playwright.sync_api import sync_playwright

    from stemqa.cli.report import main as report_main

    main, other = runs
    assert report_main([str(main.path), "--compare", str(other.path)]) == 0
    out = main.path / "report.html"
    page_html = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page_html)  # self-contained: nothing fetched
    assert "not in this run" not in page_html  # every section has content for this run
    assert "<h1>Model card: report test</h1>" in page_html and "<h2>Letter bias</h2>" in page_html

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(out.resolve().as_uri())
        imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
        tables = page.eval_on_selector_all("table", "els => els.map(e => e.innerText)")
        page.screenshot(path=str(ARTIFACTS / "report_page.png"), full_page=True)
        browser.close()
    alts = [a for a, _, _ in imgs]
    assert alts == ["Train loss over steps", "DPO validation reward accuracy and margin", "Quantization trade-off",
                    "filter"]
    assert all(done and width > 300 for _, done, width in imgs), imgs

    eval_table = next(t for t in tables if "subject" in t and "dpo / mmlu" in t)
    metrics = json.loads((main.path / "eval/quant/mmlu/metrics.json").read_text())
    for subj, v in metrics["per_subject"].items():
        assert f"{v['accuracy']:.3f} ({v['n']})" in eval_table and subj in eval_table
    card = next(t for t in tables if "vs base best" in t)  # the model card's markdown tables render as tables
    assert "quant" in card and "reference" in card
    rag = next(t for t in tables if "retrieval metric" in t)
    assert "recall@5" in rag and f"{main.manifest()['stages']['rag']['metrics']['recall@5']:.3f}" in rag


def test_eval_stage_logs_per_subject_accuracy(runs):
    from stemqa.tracking import read_rows

    main, _ = runs
    log_stage(main, "eval", main.manifest()["stages"]["eval"]["metrics"], TrackingConfig(backends=["tensorboard"]))
    summary = read_rows(main.path, "eval")[-1]
    per_subject = json.loads((main.path / "eval/quant/mmlu/metrics.json").read_text())["per_subject"]
    assert {k.split(".")[-1]: v for k, v in summary.items() if k.startswith("quant.mmlu.")} == \
        {s: v["accuracy"] for s, v in per_subject.items()}
    assert (main.path / "tensorboard" / "eval").is_dir()


def test_comparison_labels_name_the_differing_setting(runs):
    from stemqa.report import _differing, loss_series, stage_history

    main, other = runs
    assert _differing([main, other], "sft") == {"demo-ga1": "grad_accum=1", "demo-ga4": "grad_accum=4"}
    from stemqa.cli.runs import lineage

    assert ("eval", "models", "quant.model") in lineage(main.manifest())
    # metrics.jsonl (written by tracking) and the stage's history file agree on the curve
    history_losses = stage_history(main, "sft").losses
    assert [v for _, v in loss_series(main, "sft")] == pytest.approx(history_losses)


def test_report_of_partial_run_says_what_is_missing(tmp_path):
    from stemqa.report import write_report

    run = Run.create(str(tmp_path), "demo")
    with run.stage("data") as rec:
        rec.add_metrics(records=3)
    html = write_report(run.path).read_text()
    assert html.count("not in this run") == 6 and "<img" not in html
