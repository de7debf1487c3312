"""Quantization on the tiny Qwen3 (hidden 64, MLP 128, so group size 32 divides every Linear) with real prompts:
each method's logits stay near full precision, the saved model reloads to the same logits with plain
transformers, lm_head stays full precision, and bad settings / missing libraries give clear errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from stemqa.config.schema import QuantConfig
from stemqa.data.mcq import load_file, write_records
from stemqa.data.paths import data_root
from stemqa.data.prompt import harness_prompt
from stemqa.models import load_causal_lm, load_tokenizer
from stemqa.quant import GroupSizeError, UnsupportedMethodError, check_group_size, quantize

# method -> (settings, (min, max) relative L2 error of the logits vs full precision on real prompts).
# Measured on tiny-qwen3: 4-bit 0.08-0.10, 8-bit 0.006-0.02. The lower bound proves the weights really
# changed at that precision (an 8-bit model is far below 0.02; an unquantized one is 0).
CASES = {
    "gptq": (dict(bits=4, group_size=32), (0.02, 0.25)),
    "smoothquant-gptq": (dict(bits=8, act_bits=8), (0.001, 0.06)),
    "int8-weight": ({}, (0.0005, 0.03)),
    "bnb-8bit": ({}, (0.0005, 0.03)),
    "bnb-4bit": ({}, (0.02, 0.25)),
}


@pytest.fixture(scope="module")
def records():
    root = data_root()
    calib, _ = load_file(root / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", subject="science", limit=8)
    probes, _ = load_file(root / "mcq/mmlu/test/college_physics_test.csv", "mmlu_csv", limit=4)
    return calib, probes


@pytest.fixture(scope="module")
def fp_model(tiny_model):
    return load_causal_lm(tiny_model)


def _logits(model, tokenizer, probes):
    enc = tokenizer([harness_prompt(q) for q in probes], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits[enc.attention_mask.bool()]


@pytest.fixture(scope="module", params=list(CASES))
def quantized(request, tiny_model, records, tmp_path_factory):
    settings, bounds = CASES[request.param]
    qcfg = QuantConfig(method=request.param, calibration_samples=8, max_seq_len=256, **settings)
    out = tmp_path_factory.mktemp("quant") / request.param
    result = quantize(qcfg, tiny_model, records[0], out)
    return request.param, result, bounds


def test_logits_stay_close_to_full_precision(quantized, fp_model, tiny_model, records):
    method, result, (lo, hi) = quantized
    tok = load_tokenizer(tiny_model)
    ref = _logits(fp_model, tok, records[1])
    got = _logits(load_causal_lm(result["model_dir"]), tok, records[1])
    rel = float((got - ref).norm() / ref.norm())
    assert lo < rel < hi, f"{method}: relative logit error {rel:.4f} outside ({lo}, {hi})"


def test_reload_gives_the_quantized_models_logits(quantized, tiny_model, records):
    method, result, _ = quantized
    assert result["reload_max_abs_diff"] is not None and result["reload_max_abs_diff"] <= 1e-5
    # and two independent reloads from disk agree exactly (the saved format is deterministic to load)
    tok = load_tokenizer(result["model_dir"])
    a = _logits(load_causal_lm(result["model_dir"]), tok, records[1])
    b = _logits(load_causal_lm(result["model_dir"]), tok, records[1])
    assert torch.equal(a, b)
    meta = json.loads((Path(result["model_dir"]) / "stemqa_quant.json").read_text())
    assert meta == result and meta["size_mb"] > 0 and meta["wall_s"] > 0
    assert not Path(result["model_dir"] + ".partial").exists()


def test_lm_head_stays_full_precision_and_the_rest_is_quantized(quantized, fp_model):
    method, result, _ = quantized
    model = load_causal_lm(result["model_dir"])
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, fp_model.lm_head.weight)
    qconf = json.loads((Path(result["model_dir"]) / "config.json").read_text())["quantization_config"]
    q_proj = model.model.layers[0].self_attn.q_proj
    if method.startswith("bnb"):
        assert qconf["llm_int8_skip_modules"] == ["lm_head"]
        assert type(q_proj).__name__ == ("Linear8bitLt" if method == "bnb-8bit" else "Linear4bit")
    else:
        assert qconf["quant_method"] == "compressed-tensors" and "lm_head" in qconf["ignore"]
        # compressed-tensors keeps the loaded Linear compressed (integer weights + scales) until a forward
        assert q_proj.quantization_scheme.weights.num_bits == result["bits"] and hasattr(q_proj, "weight_scale")
        assert not hasattr(model.lm_head, "quantization_scheme") and not hasattr(model.lm_head, "weight_scale")


def test_group_size_that_does_not_divide_a_layer_names_it(tiny_model, records, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(GroupSizeError) as err:
        quantize(QuantConfig(method="gptq", group_size=48), tiny_model, records[0], out)
    msg = str(err.value)
    assert "quant.group_size=48" in msg and "model.layers.0.self_attn.q_proj (in_features=64)" in msg
    assert not (out / "config.json").exists() and not (tmp_path / "q.partial").exists()


def test_group_size_check_on_smollm2_shapes(smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2))
    check_group_size(model, 64)  # the demo setting divides 576 and 1536
    with pytest.raises(GroupSizeError, match=r"self_attn\.q_proj \(in_features=576\)"):
        check_group_size(model, 128)


def test_method_without_implementation_is_a_clear_error(tiny_model, records, tmp_path):
    qcfg = QuantConfig.model_construct(**{**QuantConfig().model_dump(), "method": "awq"})  # past the Literal
    with pytest.raises(UnsupportedMethodError, match="'awq' is not available.*available: gptq.*qat"):
        quantize(qcfg, tiny_model, records[0], tmp_path / "q")


def test_missing_bitsandbytes_names_it(tiny_model, records, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the library were not installed
    with pytest.raises(UnsupportedMethodError,
                       match="cannot run on this machine; missing: the Python package 'bitsandbytes'"):
        quantize(QuantConfig(method="bnb-4bit"), tiny_model, records[0], tmp_path / "q")


def test_quantize_job_runs_as_a_ray_task(ray_local, tiny_model, records, tmp_path, capsys):
    from jobs.quantize import main

    calib = tmp_path / "calib.jsonl"
    write_records(records[0], calib)
    out = tmp_path / "model"
    args = ["--config", "demo", "--address", "local", "--model", tiny_model, "--calib", str(calib)]
    assert main(args + ["--out", str(out), "--set", "quant.group_size=32", "--set", "quant.calibration_samples=4"]) == 0
    result = json.loads(capsys.readouterr().out)["metrics"]
    assert result["method"] == "gptq" and result["calibration_samples"] == 4 and result["group_size"] == 32
    assert load_causal_lm(str(out)).lm_head.weight.dtype == torch.float32
    with pytest.raises(SystemExit):  # a bad group size is one clear line, not a Ray traceback
        main(args + ["--out", str(tmp_path / "bad"), "--set", "quant.group_size=48"])
    assert "quant.group_size=48 does not divide" in capsys.readouterr().err
