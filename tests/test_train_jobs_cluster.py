"""`jobs.sft` and `jobs.dpo` submitted with Ray's own `ray job submit` to the real local two-node cluster, as a
user would; the saved models load with plain transformers and `jobs.eval` scores the DPO model."""
import json
import re
from pathlib import Path

import pytest


def last_json(logs: str) -> dict:
    """The job's printed result {"summary", "metrics", "artifacts", "history"} (the last JSON object in its output)."""
    start = logs.rindex('\n{\n') + 1
    return json.loads(logs[start:logs.index("\n}", start) + 2])


@pytest.mark.cluster
@pytest.mark.slow  # two Ray Train runs (each ~45 s of start-up on 2 CPUs) and an eval: 3-5 min
def test_sft_then_dpo_submitted_as_ray_jobs_save_models_that_load_and_evaluate(submit_job, shared_data,
                                                                               tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from stemqa.data.mcq import load_file, write_records

    records, _ = load_file(shared_data / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", subject="science", limit=16)
    write_records(records, tmp_path / "train.jsonl")
    common = ["--config", "tests/configs/tiny.yaml", "--set", f"data.root={shared_data}"]

    logs = submit_job("jobs.sft", *common, "--train", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "sft"))
    sft = last_json(logs)
    # the Train worker's progress reached the job's log (a worker process, log_to_driver off: stemqa.progress)
    assert re.search(r"\[sft\] step 2/2 \(100%\)  loss \d", logs), logs[-3000:]
    sft_model = sft["artifacts"]["model"]
    assert sft["metrics"]["steps"] == 2 and Path(sft_model).is_dir()
    assert AutoModelForCausalLM.from_pretrained(sft_model).config.model_type == "qwen3"
    assert any(Path(sft_model).glob("*.safetensors")) and not any(Path(sft_model).glob("*.bin"))

    dpo = last_json(submit_job("jobs.dpo", *common, "--prepare", "--pairs", str(tmp_path / "pairs"),
                               "--model", sft_model, "--out", str(tmp_path / "dpo")))
    assert (tmp_path / "pairs" / "train.jsonl").is_file() and dpo["metrics"]["pairs"]["train"] > 0
    assert 0 <= dpo["metrics"]["val_reward_accuracy_best"] <= 1
    model = AutoModelForCausalLM.from_pretrained(dpo["artifacts"]["model"])
    assert model.config.model_type == "qwen3"

    logs = submit_job("jobs.eval", *common, "--model", dpo["artifacts"]["model"], "--out", str(tmp_path / "eval"),
                      timeout=600)
    metrics = json.loads((tmp_path / "eval" / "mmlu_stem" / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 1
    preds = (tmp_path / "eval" / "mmlu_stem" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 8 and "mmlu_stem" in logs
