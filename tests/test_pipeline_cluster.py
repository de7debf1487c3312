"""The main job on the real local two-node cluster, submitted with `ray job submit` as a user would."""
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

RAY = str(Path(sys.executable).parent / "ray")
# the port the pipeline's Serve stage binds on the cluster (tests/configs/tiny.yaml says 8011)
SERVE_PORT = int(os.environ.get("STEMQA_TEST_PIPELINE_SERVE_PORT", "8011"))


def test_local_cluster_has_two_nodes(local_cluster):
    out = subprocess.run([RAY, "list", "nodes", "--address", local_cluster["address"], "--format", "json"],
                         capture_output=True, text=True, env=local_cluster["env"], timeout=60)
    nodes = [n for n in json.loads(out.stdout) if n["state"] == "ALIVE"]
    assert len(nodes) == 2 and sum(n["is_head_node"] for n in nodes) == 1


def test_pipeline_submitted_as_a_ray_job(submit_job, tmp_path, shared_data):
    """Every stage runs on the cluster, artifacts land in the run directory, the served model answers."""
    run_dir = tmp_path / "runs" / "tiny-job"
    logs = submit_job("jobs.pipeline", "--config", "tests/configs/tiny.yaml", "--run", str(run_dir),
                      "--set", f"data.root={shared_data}", "--set", f"cluster.storage_path={tmp_path / 'runs'}",
                      "--set", f"serve.port={SERVE_PORT}",
                      timeout=1200)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert list(stages) == ["data", "filter", "sft", "dpo", "quant", "rag", "eval", "select", "serve"]
    assert all(s["status"] == "done" for s in stages.values())
    from stemqa.train.common import tcmalloc_soname  # the train workers' allocator, as the job's nodes have it

    allocator = "tcmalloc" if tcmalloc_soname() else "system"
    assert [stages[s]["metrics"]["allocator"] for s in ("sft", "dpo")] == [allocator, allocator]
    for stage, key in [("filter", "kept"), ("sft", "model"), ("dpo", "model"), ("quant", "model"), ("rag", "index")]:
        assert (run_dir / stages[stage]["artifacts"][key]).exists(), (stage, key)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run_dir / stages["quant"]["artifacts"]["model"]).model_type == "qwen3"
    metrics = json.loads((run_dir / stages["eval"]["artifacts"]["quant"] / "mmlu_stem" / "metrics.json").read_text())
    assert metrics["n"] == 8
    answer = json.loads((run_dir / stages["serve"]["artifacts"]["answer"]).read_text())
    assert answer["answer"] in "ABCD" and abs(sum(answer["probabilities"].values()) - 1) < 1e-3
    # the app answers in the (model, mode) the select stage chose on dev, with its fitted parameters
    chosen = stages["select"]["metrics"]
    assert answer["mode"] == chosen["chosen_mode"] and answer["calibration"]["model"] == chosen["chosen_model"]
    assert stages["serve"]["inputs"]["mode_params"] == stages["select"]["artifacts"]["mode_params"]
    assert "## Dev selection" in (run_dir / "model_card.md").read_text()
    assert "Model card: what is served and why" in (run_dir / "report.html").read_text()
    assert "stemqa pipeline" in logs  # the summary table was printed
    # progress while the stages ran, from the Train workers and Ray tasks on both nodes, in the job's log
    assert "[sft] step 2/2 (100%)" in logs and "[dpo] step 2/2 (100%)" in logs, logs[-4000:]

    # the Train workers logged each step into the stage's MLflow run as they trained (one timestamp per step;
    # the driver adds only the summary afterwards), the runs children of the stemqa run's parent run
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants it for a file store
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("stemqa")
    logged = {r.data.tags["stemqa_stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert {"-", "data", "sft", "dpo", "eval"} <= set(logged)
    assert {r.info.status for r in logged.values()} == {"FINISHED"}  # the parent run too, at the end
    for stage, key, steps in (("sft", "train/loss", [1, 2]), ("dpo", "val/reward_accuracy", [0, 1, 2])):
        hist = client.get_metric_history(logged[stage].info.run_id, key)
        assert sorted(h.step for h in hist) == steps, (stage, hist)
        assert len({h.timestamp for h in hist}) == len(steps), (stage, hist)
    assert logged["sft"].data.metrics["train_loss_last"] == pytest.approx(stages["sft"]["metrics"]["train_loss_last"])

    # the app keeps serving after the job: a second question over real HTTP
    r = httpx.post(f"http://127.0.0.1:{SERVE_PORT}/v1/mcqa", json={"question": "Which gas do plants take in?",
                   "choices": ["oxygen", "carbon dioxide"], "use_rag": True, "top_k": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["answer"] in "AB"
    assert all(p["source"] for p in r.json()["passages"])
