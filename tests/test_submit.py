"""`stemqa submit / jobs / stop` on the real two-node local cluster, and what a submission carries.

The cluster tests share the session's `local_cluster` (cluster/local.sh: head + worker node). The last one
stops the worker node mid-run and brings it back, so it stays last in this module.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEMQA = str(Path(sys.executable).parent / "stemqa")


def stemqa(args, env, timeout=400):
    t0 = time.time()
    out = subprocess.run([STEMQA, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return out.returncode, out.stdout + out.stderr, time.time() - t0


def job_id_of(output: str) -> str:
    return re.search(r"job (raysubmit_\w+) submitted", output).group(1)


# ---- what gets submitted (no cluster needed) ------------------------------------------------------------

def test_submission_has_absolute_paths_env_and_excludes(tmp_path, monkeypatch):
    import argparse
    import shlex

    from ray._private.runtime_env.packaging import _get_excludes

    from stemqa.cli import submit

    monkeypatch.chdir(tmp_path)  # relative paths are the submitter's, not the job's working dir
    monkeypatch.setenv("STEMQA_API_KEY_HINT", "x")
    args = argparse.Namespace(stage="eval", config=str(ROOT / "tests/configs/tiny.yaml"), run="runs/r1",
                              overrides=["cluster.storage_path=runs", "data.root=.", "eval.batch_size=4"],
                              pip=True, job_id=None, entrypoint_num_gpus=0)
    sub = submit.build_submission(args, ["--model", "tiny-qwen3"])
    argv = shlex.split(sub["entrypoint"])
    assert argv[:4] == ["python", "-m", "stemqa.cli", "eval"]
    assert argv[argv.index("--config") + 1] == "tests/configs/tiny.yaml"  # inside the uploaded repo
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["eval.batch_size=4", f"cluster.storage_path={tmp_path / 'runs'}", f"data.root={tmp_path}"]
    assert argv[argv.index("--run") + 1] == str(tmp_path / "runs" / "r1") and argv[-2:] == ["--model", "tiny-qwen3"]
    env = sub["runtime_env"]["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["STEMQA_API_KEY_HINT"] == "x" and "STEMQA_CLUSTER_DIR" not in env
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in env  # init_ray sets it; a repeated key fails the job
    assert "ray[data,train,tune,serve]==2.60.0" in sub["runtime_env"]["pip"]["packages"]
    # Ray's own matcher decides what is uploaded: stemqa/data stays, data/ runs/ .venv/ do not
    excluded = _get_excludes(ROOT, sub["runtime_env"]["excludes"])
    assert not excluded(ROOT / "stemqa" / "data" / "mcq.py") and not excluded(ROOT / "tests" / "configs" / "tiny.yaml")
    assert all(excluded(ROOT / p) for p in ("runs/x/manifest.json", ".venv/bin/python", "data/x.csv",
                                            "tests/artifacts/a.png", "stemqa/__pycache__/cli.cpython-311.pyc"))


def test_bad_submissions_fail_before_upload(tmp_path, monkeypatch):
    import argparse

    from stemqa.cli import submit
    from stemqa.config import ConfigError

    def ns(**kw):
        base = dict(stage="eval", config="demo", run=None, overrides=[], pip=False, job_id=None, entrypoint_num_gpus=0)
        return argparse.Namespace(**{**base, **kw})

    with pytest.raises(submit.SubmitError, match="unknown stage 'trian'"):
        submit.build_submission(ns(stage="trian"), [])
    with pytest.raises(ConfigError, match=r"sft\.lr"):
        submit.build_submission(ns(overrides=["sft.lr=-1"]), [])
    outside = tmp_path / "mine.yaml"
    outside.write_text("base: demo\n")
    with pytest.raises(submit.SubmitError, match="outside the repository"):
        submit.build_submission(ns(config=str(outside)), [])
    monkeypatch.setenv("STEMQA_CLUSTER_DIR", str(tmp_path / "no-cluster"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, _ = stemqa(["submit", "data"], dict(os.environ), timeout=60)
    assert code == 2 and "no cluster address" in out


# ---- on the real two-node cluster ----------------------------------------------------------------------

@pytest.mark.cluster
def test_submitted_job_runs_on_both_nodes_and_writes_to_storage(local_cluster, tmp_path):
    store = tmp_path / "store"
    code, out, secs = stemqa(["submit", "nodes", "--config", "tests/configs/tiny.yaml", "--run", str(store / "n1"),
                              "--set", f"cluster.storage_path={store}", "--timeout", "240"], local_cluster["env"])
    assert code == 0, out[-4000:]
    assert re.search(r"job raysubmit_\w+ SUCCEEDED", out)
    placement = json.loads((store / "n1" / "nodes" / "placement.json").read_text())
    assert len(placement) == 2 and len({row["node_id"] for row in placement}) == 2
    assert {tuple(row["resources"]) for row in placement} == {("head",), ("worker_node",)}
    for row in placement:  # each node's task ran on the node it was pinned to and wrote into storage itself
        assert row["node_id"] == row["expected_node"]
        assert json.loads(Path(row["file"]).read_text())["node_id"] == row["node_id"]
    assert "worker_node" in out and "head" in out  # the job's output says which node ran what
    manifest = json.loads((store / "n1" / "manifest.json").read_text())
    assert manifest["stages"]["nodes"]["status"] == "done" and manifest["stages"]["nodes"]["metrics"]["ok"] == 2


@pytest.mark.cluster
@pytest.mark.slow  # 50-70 s on a loaded 2-CPU machine (model load in a Ray task)
def test_submitted_eval_stage_lands_artifacts_in_storage(local_cluster, tmp_path, tiny_model, shared_data):
    store = tmp_path / "store"
    code, out, _ = stemqa(["submit", "eval", "--config", "tests/configs/tiny.yaml", "--set", "model.name=tiny-qwen3",
                           "--set", f"data.root={shared_data}", "--set", f"cluster.storage_path={store}",
                           "--run", str(store / "ev"), "--timeout", "400"], local_cluster["env"])
    assert code == 0, out[-4000:]
    manifest = json.loads((store / "ev" / "manifest.json").read_text())
    results = store / "ev" / manifest["stages"]["eval"]["artifacts"]["tiny-qwen3"]  # under the model's name
    metrics = json.loads((results / "mmlu_stem" / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 1
    assert f"results: {results}" in out  # the job's own output, followed by `stemqa submit`


@pytest.mark.cluster
def test_jobs_lists_and_stop_stops(local_cluster, tmp_path):
    env = local_cluster["env"]
    code, out, _ = stemqa(["submit", "nodes", "--config", "tests/configs/tiny.yaml", "--no-wait", "--hold", "300",
                           "--set", f"cluster.storage_path={tmp_path}"], env, timeout=200)
    assert code == 0, out
    job = job_id_of(out)
    code, listing, _ = stemqa(["jobs"], env, timeout=60)
    row = next(line for line in listing.splitlines() if line.startswith(job))
    assert code == 0 and re.search(r"(PENDING|RUNNING)", row) and "cluster/nodes.py" in row
    code, out, secs = stemqa(["stop", job, "--wait", "60"], env, timeout=120)
    assert code == 0 and f"job {job}: STOPPED" in out, out
    code, out, _ = stemqa(["stop", "raysubmit_doesnotexist"], env, timeout=60)
    assert code == 2 and "raysubmit_doesnotexist" in out


@pytest.mark.cluster
def test_job_fails_clearly_when_its_worker_node_is_stopped(local_cluster, tmp_path):
    """The worker node dies while its task runs: the job ends FAILED naming the node, well before the bound."""
    env, store = local_cluster["env"], tmp_path / "store"
    local_sh = ["bash", str(ROOT / "cluster" / "local.sh")]
    proc = subprocess.Popen([STEMQA, "submit", "nodes", "--config", "tests/configs/tiny.yaml", "--hold", "15",
                             "--timeout", "240", "--run", str(store / "f1"), "--set", f"cluster.storage_path={store}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    try:
        for line in proc.stdout:  # the tasks are placed once the job prints the node count
            lines.append(line)
            if "alive nodes" in line:
                break
        time.sleep(3)
        stopped = subprocess.run(local_sh + ["stop-worker"], env=env, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        t0 = time.time()
        rest, _ = proc.communicate(timeout=300)
        out = "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(local_sh + ["start-worker"], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 1, out[-4000:]
    assert re.search(r"job raysubmit_\w+ FAILED", out) and "NodeDiedError" in out and "(worker_node)" in out
    assert time.time() - t0 < 120  # the head's task still had to finish its 15 s; no hang on the dead node
    stage = json.loads((store / "f1" / "manifest.json").read_text())["stages"]["nodes"]
    assert stage["status"] == "failed" and "worker_node" in stage["error"]
    placement = {tuple(r["resources"]): r for r in json.loads((store / "f1" / "nodes" / "placement.json").read_text())}
    assert "error" not in placement[("head",)] and "NodeDiedError" in placement[("worker_node",)]["error"]
