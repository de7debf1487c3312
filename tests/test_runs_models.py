"""The run store keeps what finished stages wrote; the model loader resolves offline names and fails clearly."""
import json

import pytest

from stemqa.models import ModelLoadError, load_causal_lm, resolve_embedder, resolve_model
from stemqa.runs import Run


def test_run_manifest_records_stages_and_survives_a_failure(tmp_path):
    run = Run.create(str(tmp_path), "t", {"a": 1})
    with run.stage("data", inputs={"src": "x"}) as st:
        (st.dir / "train.jsonl").write_text("{}\n")
        st.add_artifact("train", st.dir / "train.jsonl")
        st.add_metrics(n=1)
    with pytest.raises(RuntimeError):
        with run.stage("sft", inputs={"train": "data/train.jsonl"}):
            raise RuntimeError("boom")
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["stages"]["data"]["status"] == "done" and m["stages"]["data"]["artifacts"]["train"] == "data/train.jsonl"
    assert m["stages"]["sft"]["status"] == "failed" and "boom" in m["stages"]["sft"]["error"]
    assert run.artifact("data", "train").read_text() == "{}\n"
    with pytest.raises(KeyError):
        run.artifact("sft", "model")
    assert Run(run.path).manifest()["config"] == {"a": 1}


def test_tiny_qwen3_is_qwen3_and_small(tiny_model):
    model = load_causal_lm(tiny_model)
    assert model.config.model_type == "qwen3"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert resolve_model("tiny-qwen3") == resolve_model("tiny-qwen3")


def test_unreachable_hub_id_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        resolve_model("Qwen/Qwen3-0.6B-Base")
    with pytest.raises(ModelLoadError, match="no such model directory"):
        resolve_model("./missing-model-dir")


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(tmp_path))


def test_embedder_from_wheel():
    path = resolve_embedder("all-MiniLM-L6-v2")
    assert path.endswith("model")
