"""QAT on the tiny Qwen3 (group size 32 divides its 64/128-wide Linears): training the torchao fake-quantized
model lowers its loss below the untrained quantization's, the compressed-tensors export reloads with plain
transformers and reproduces the fake-quantized model's logits, lm_head stays full precision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stemqa.config.schema import QuantConfig
from stemqa.data.mcq import load_file
from stemqa.data.paths import data_root
from stemqa.models import load_causal_lm, load_tokenizer
from stemqa.quant import GroupSizeError, qat, quantize
from stemqa.quant.calibration import calibration_texts


@pytest.fixture(scope="module")
def texts():
    recs, _ = load_file(data_root() / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", subject="science", limit=8)
    return calibration_texts(recs, 8)


@pytest.mark.slow  # QAT training plus export: minutes on 2 CPUs; the quantize() path below stays in the default run
@pytest.mark.parametrize("bits", [4, 2])
def test_qat_lowers_fake_quant_loss_and_export_reloads_to_the_same_logits(bits, tiny_model, texts, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model)
    fp_head = model.lm_head.weight.detach().clone()
    qcfg = QuantConfig(method="qat", bits=bits, group_size=32, qat_steps=5, qat_lr=3e-3, qat_batch_size=8,
                       max_seq_len=96)
    qat.prepare(model, bits, 32, tok(texts[0], return_tensors="pt").input_ids)
    layers = qat.fake_quantized_layers(model)
    assert len(layers) == 14 and not any(n.endswith("lm_head") for n in layers)  # 2 layers x 7 Linears
    scale0 = {n: m.weight_fake_quantizer.scale.detach().clone() for n, m in layers.items()}
    before = qat.lm_loss(model, tok, texts, 96)
    qat.train(model, tok, texts, qcfg)
    after = qat.lm_loss(model, tok, texts, 96)
    assert after < before - 0.05, f"QAT did not lower the fake-quant loss: {before:.3f} -> {after:.3f}"
    assert any(not torch.equal(scale0[n], m.weight_fake_quantizer.scale) for n, m in layers.items()), \
        "the scales were not learned"

    enc = tok(texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        fake = model(**enc).logits[enc.attention_mask.bool()]
    qat.export(model, qcfg, tmp_path, tok)
    reloaded = load_causal_lm(str(tmp_path))
    with torch.no_grad():
        real = reloaded(**enc).logits[enc.attention_mask.bool()]
    assert float((real - fake).abs().max()) < 1e-3
    qconf = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    weights = qconf["config_groups"]["group_0"]["weights"]
    assert qconf["format"] == "pack-quantized" and weights["num_bits"] == bits and weights["group_size"] == 32
    assert "lm_head" in qconf["ignore"] and torch.equal(reloaded.lm_head.weight, fp_head)
    # the stored weights are packed integers (int32 words holding 32/bits values), not floats
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape == (64, 64 * bits // 32)


def test_qat_through_quantize_and_its_group_size_check(tiny_model, texts, tmp_path):
    from stemqa.data.mcq import load_file as lf

    recs, _ = lf(data_root() / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", subject="science", limit=8)
    with pytest.raises(GroupSizeError, match=r"quant.group_size=48 .*self_attn\.q_proj \(in_features=64\)"):
        quantize(QuantConfig(method="qat", group_size=48), tiny_model, recs, tmp_path / "bad")
    res = quantize(QuantConfig(method="qat", bits=4, group_size=32, qat_steps=1, calibration_samples=8,
                               max_seq_len=128), tiny_model, recs, tmp_path / "q")
    assert res["method"] == "qat" and res["bits"] == 4 and res["calibration_samples"] == 8
    assert res["reload_max_abs_diff"] <= 1e-4 and (Path(res["model_dir"]) / "stemqa_quant.json").exists()
