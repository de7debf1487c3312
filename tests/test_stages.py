"""The stage contract: the pipeline is a loop over the configured stages that honours `enabled` and resumes;
commands take data files directly; progress reaches the terminal from Ray workers; the layers hold."""
from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stemqa.config import ConfigError, load_config
from stemqa.runs import Run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "stemqa" / "sample_data"
ARC = "mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl"


# ---- the pipeline loop ----------------------------------------------------------------------------------
def test_pipeline_skips_disabled_stages_and_resumes_finished_ones(tmp_path, capsys):
    """`stages` is the loop; a stage with enabled: false is not run (the next reads what is there), a finished
    one is not run again. data needs no Ray, and SFT is switched off, so nothing here starts Ray."""
    from stemqa.pipeline import run_pipeline

    cfg = load_config("demo", ["stages=[data, filter, sft]", "filter.enabled=false", "sft.enabled=false",
                               f"cluster.storage_path={tmp_path}", "tracking.backends=[]",
                               f"data.train=[{{path: {ARC}, format: arc_jsonl, limit: 12}}]"])
    run = Run.create(str(tmp_path), cfg.name, cfg.model_dump(mode="json"))
    rows = run_pipeline(cfg, run, SAMPLE)
    assert [(r.stage, r.summary) for r in rows] == [("data", "12 MCQs from 1 files"),
                                                    ("filter", "skipped (filter.enabled is false)"),
                                                    ("sft", "skipped (sft.enabled is false)")]
    stages = run.manifest()["stages"]
    assert list(stages) == ["data"] and stages["data"]["metrics"] == {"records": 12, "skipped": 0}
    assert (run.path / "data" / "metrics.jsonl").exists()  # recorded like every stage: manifest + tracking rows
    assert "[filter] skipped: filter.enabled is false" in capsys.readouterr().out
    again = run_pipeline(cfg, run, SAMPLE)
    assert again[0].summary == "done earlier (resumed)"


def test_a_stage_reads_earlier_stages_or_says_what_is_missing(tmp_path):
    from stemqa.stages import get
    from stemqa.stages.base import StageContext, StageInputError

    cfg = load_config("demo", ["model.name=tiny-qwen3"])
    run = Run.create(str(tmp_path), "t")
    ctx = StageContext(cfg, run.stage_dir("sft"), SAMPLE, run=run)
    with pytest.raises(StageInputError, match="stage sft needs training records"):
        get("sft").inputs_from_run(ctx)
    with run.stage("data") as rec:  # no filter stage: SFT trains on data's records, DPO starts from model.name
        (rec.dir / "train.jsonl").write_text("")
        rec.add_artifact("train", rec.dir / "train.jsonl")
    assert get("sft").inputs_from_run(ctx).train == str(run.path / "data" / "train.jsonl")
    assert get("dpo").inputs_from_run(ctx).base_model == "tiny-qwen3"
    assert get("quant").inputs_from_run(ctx).model == "tiny-qwen3"
    with pytest.raises(StageInputError, match="eval.models lists quant"):
        get("eval").inputs_from_run(ctx)
    assert get("sft").manifest_inputs(get("sft").inputs_from_run(ctx), run) == {
        "train": "data/train.jsonl", "base_model": "tiny-qwen3"}


def test_stage_list_and_sections_are_checked_at_load():
    with pytest.raises(ConfigError, match="stages: unknown stage.s. trian"):
        load_config("demo", ["stages=[data, trian]"])
    with pytest.raises(ConfigError, match="listed twice: data"):
        load_config("demo", ["stages=[data, data]"])
    assert load_config("demo").stages == ["data", "filter", "sft", "dpo", "quant", "rag", "eval", "select", "serve"]


@pytest.mark.parametrize("override, path, words", [
    ("sft.resources.offload_params=true", "sft.resources", "offload_params=true needs zero_stage=3"),
    ("quant.bits=3", None, None),  # gptq takes 3 bits
    ("quant.method=smoothquant-gptq", None, None),  # 4-bit weights (W4A8) are one of its settings
    ("quant.act_bits=8", "quant", "activation quantization is smoothquant-gptq's"),
    ("dpo.split=[0.6, 0.2, 0.2]", "dpo", "dpo.split=[0.6, 0.2, 0.2] and dpo.split_sizes=[48, 16, 16] are both set"),
    ("cluster.storage_path=s3://bucket/runs", "cluster.storage_path", "mount the bucket"),
    ("quant.keep_lm_head=false", "quant.keep_lm_head", "unknown field"),
])
def test_cross_field_checks_fail_at_load_with_their_path(override, path, words):
    if path is None:
        load_config("demo", [override])  # a valid combination loads
        return
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert f"  {path}: " in str(e.value) and words in str(e.value), str(e.value)


def test_bits_per_method_and_cli_config_error_names_the_path():
    with pytest.raises(ConfigError, match=r"quant: quant.bits=3 is not supported by quant.method=qat"):
        load_config("demo", ["quant.method=qat", "quant.bits=3"])
    out = subprocess.run([sys.executable, "-m", "stemqa.cli", "config", "--set", "sft.resources.offload_params=true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "sft.resources: offload_params=true needs zero_stage=3" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_configs_share_one_base_with_their_own_defaults():
    from stemqa.config.schema import DPOConfig, SFTConfig, TrainConfig

    shared = set(TrainConfig.model_fields)
    assert shared <= set(SFTConfig.model_fields) and shared <= set(DPOConfig.model_fields)
    assert (SFTConfig().lr, DPOConfig().lr, SFTConfig().batch_size, DPOConfig().batch_size) == (1e-5, 1e-6, 4, 2)
    assert SFTConfig.model_fields["lr"].description == DPOConfig.model_fields["lr"].description  # kept by the base
    with pytest.raises(ValueError):
        DPOConfig(lr=0)


# ---- commands take data files --------------------------------------------------------------------------
def test_sft_data_file_in_any_mcq_layout_becomes_its_training_records(tmp_path):
    from stemqa.data.mcq import read_records
    from stemqa.stages import get
    from stemqa.stages.base import StageContext

    stage = get("sft")
    p = argparse.ArgumentParser()
    stage.add_arguments(p)
    ctx = StageContext(load_config("demo"), tmp_path, SAMPLE)
    inputs = stage.inputs_from_args(p.parse_args(["--data", str(SAMPLE / ARC), "--format", "arc_jsonl"]), ctx)
    records = read_records(inputs.train)
    assert inputs.train == str(tmp_path / "train.jsonl") and len(records) > 10 and records[0].choices
    native = stage.inputs_from_args(p.parse_args(["--data", inputs.train]), ctx)  # records already: used as is
    assert native.train == inputs.train and native.base_model == "smollm2-135m-instruct"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        stage.inputs_from_args(p.parse_args(["--data", str(tmp_path / "nope.jsonl")]), ctx)


def test_eval_takes_a_data_file_with_its_format_and_scoring(ray_local, tiny_model, tmp_path, capsys):
    """`stemqa eval --data F --format hf_jsonl --scoring cloze`: the file is the eval set, cloze scoring."""
    from jobs.eval import main

    rows = [{"question": f"Which is the {w} one?", "choices": [w, "other", "neither"], "answer": 0,
             "subject": "physics"} for w in ("first", "second", "third")]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["--model", tiny_model, "--data", str(data), "--format", "hf_jsonl", "--scoring", "cloze",
                 "--out", str(out), "--local"]) == 0
    metrics = json.loads((out / "mine" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["scoring"] == "cloze"
    printed = capsys.readouterr().out
    assert re.search(r"mine\s+3\s+\d\.\d{3}", printed) and f"results: {out}" in printed


def test_select_serves_the_base_in_its_best_mode_when_no_trained_model_beats_it(ray_local, tiny_model, tmp_path):
    """The select stage in a run: every candidate x mode fitted on dev (real Ray tasks), the selection, the chosen
    mode's parameters, the model card in the run; an 'sft' that is the base model itself cannot beat it, so the
    base is served in its best dev mode, the summary says so, and the serve stage reads that choice."""
    from stemqa.stages import get
    from stemqa.stages.base import StageContext, record_stage
    from stemqa.stages.serve import serving_sources

    cfg = load_config("tests/configs/tiny.yaml", [f"model.name={tiny_model}", "tracking.backends=[]",
                                                   "eval.sets=[]", "select.dev_limit=5"])
    run = Run.create(str(tmp_path), "sel")
    with run.stage("sft") as rec:  # a "trained" model that is the base model: no better by construction
        rec.add_artifact("model", Path(tiny_model))
    stage = get("select")
    ctx = StageContext(cfg, run.stage_dir("select"), SAMPLE, run=run)
    inputs = stage.inputs_from_run(ctx)
    assert sorted(inputs.models) == ["base", "sft"]
    result = record_stage(stage, ctx, inputs)
    assert not result.trained_beats_base and result.chosen_model == "base"
    assert result.summary.startswith("no trained model beats the base on dev; serving the base model")
    sel = json.loads((run.path / "select" / "selection.json").read_text())
    assert {(s["model"], s["mode"]) for s in sel["scores"]} == {
        (m, mode) for m in ("base", "sft") for mode in ("letter", "letter_debiased", "cloze_question")}
    assert sel["chosen"]["accuracy"]["n"] == 10  # 5 questions from each of the two dev sets
    params = json.loads((run.path / "select" / "mode_params.json").read_text())
    assert params["mode"] + ("_question" if params["cloze_template"] == "question" else "") == result.chosen_mode
    card = (run.path / "model_card.md").read_text()
    assert "**No trained model beat the base model on dev: the base model is served.**" in card
    assert "## Letter bias" in card and "## Calibration" in card
    assert run.manifest()["stages"]["select"]["metrics"]["chosen_model"] == "base"
    assert serving_sources(cfg, run=run)[0] == tiny_model  # the base, not the run's last model
    assert get("serve").inputs_from_run(StageContext(cfg, run.stage_dir("serve"), SAMPLE, run=run)).mode_params \
        == str(run.path / "select" / "mode_params.json")


# ---- progress ------------------------------------------------------------------------------------------
def test_progress_lines_with_rate_and_eta_in_a_log():
    from stemqa.progress import Progress

    stream = io.StringIO()
    progress = Progress(stream=stream, interval_s=0)
    task = progress.task("sft", unit="steps")
    for step in (1, 2, 3, 4):
        task.update(step, 4, loss=2.0 / step, tokens_per_s=1234.5)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[sft] step 1/4 (25%)  loss 2  1,234 tokens/s")
    assert "ETA" in lines[1] and lines[-1].startswith("[sft] step 4/4 (100%)") and " in " in lines[-1]
    quiet = io.StringIO()
    slow = Progress(stream=quiet, interval_s=3600).task("x", unit="rows")
    for i in range(1, 101):
        slow.update(i, 100)
    assert len(quiet.getvalue().splitlines()) == 2  # the first and the last only, in a log


def test_progress_from_a_ray_task_reaches_the_driver(ray_local):
    """A Ray task (another process) updates a remote task; the driver's display prints its numbers."""
    import ray

    from stemqa.progress import Progress

    @ray.remote(num_cpus=0.1)
    def work(task):
        import time

        for i in range(1, 6):
            task.update(i, 5, loss=1.0 / i)
            time.sleep(0.3)
        return True

    stream = io.StringIO()
    progress = Progress(stream=stream, interval_s=0)
    assert ray.get(work.remote(progress.remote("train", unit="steps")))
    progress.close()
    text = stream.getvalue()
    assert "[train] step 5/5 (100%)  loss 0.2" in text, text


# ---- layers and sizes (the measurements) -------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_the_library_never_imports_jobs_serve_or_benchmarks():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"jobs", "serve", "benchmarks"})
                 for p in (ROOT / "stemqa").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_module_sizes_and_no_stage_names_in_the_sweep_code():
    # the project's code (not runs/ a demo left behind, with DeepSpeed's zero_to_fp32.py copies, nor .venv)
    too_long = {str(p.relative_to(ROOT)): n for top in ("stemqa", "jobs", "serve", "cluster")
                for p in (ROOT / top).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not too_long, too_long
    assert len((ROOT / "jobs" / "pipeline.py").read_text().splitlines()) < 100
    for p in (ROOT / "stemqa" / "tune").glob("*.py"):
        code = "\n".join(ln.split("#")[0] for ln in p.read_text().splitlines())
        assert not re.search(r"""["'](sft|dpo|quant|filter|rag|eval)["']""", code), p


def test_importing_ray_utils_leaves_the_environment_alone(tmp_path):
    (tmp_path / "address").write_text("127.0.0.1:1")
    (tmp_path / "env").write_text("export RAY_AUTH_MODE=token\n")
    code = ("import os, stemqa.ray_utils as r; a = os.environ.get('RAY_AUTH_MODE'); r.load_cluster_env(); "
            "print(a, os.environ.get('RAY_AUTH_MODE'))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "STEMQA_CLUSTER_DIR": str(tmp_path)},
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.stdout.split() == ["None", "token"], out.stderr


def test_search_spaces_ship_with_the_package_and_a_base_resolves_beside_its_space(tmp_path, monkeypatch):
    from stemqa.tune.space import SPACE_DIR, load_space

    assert SPACE_DIR.is_relative_to(ROOT / "stemqa") and (SPACE_DIR / "sft.yaml").exists()
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "mine.yaml").write_text("base: demo\nsft: {lr: 3.0e-4}\n")
    (tmp_path / "spaces" / "space.yaml").write_text(
        "stage: sft\nbase: mine.yaml\nfixed: {sft.eval_every: 1}\nparams: {sft.grad_accum: [1, 2]}\n")
    monkeypatch.chdir(tmp_path)  # not the directory of either file
    space = load_space(str(tmp_path / "spaces" / "space.yaml"))
    assert space.base.sft.lr == 3e-4 and space.sweep.metric == "eval_loss"
    (tmp_path / "spaces" / "noeval.yaml").write_text("stage: sft\nparams: {sft.grad_accum: [1, 2]}\n")
    with pytest.raises(ConfigError, match="sft.eval_every is null"):
        load_space(str(tmp_path / "spaces" / "noeval.yaml"))
