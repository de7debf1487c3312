"""`quantize`: run one method from the table on a model directory and record what it produced."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

from stemqa.config.schema import QuantConfig
from stemqa.data.mcq import MCQ
from stemqa.quant.calibration import calibration_texts
from stemqa.quant.errors import QuantError
from stemqa.quant.methods import get_method

META_FILE = "stemqa_quant.json"
# Reload-check prompt for methods without calibration data (a harness-style question).
PROBE = ("The following are multiple choice questions (with answers) about physics.\n\n"
         "What is the SI unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer: B")
RELOAD_TOLERANCE = 1e-4  # the reload must give the same logits; float noise only


def reload_max_abs_diff(model, saved_dir: Path, text: str) -> float:
    """Largest |logit difference| between the in-memory quantized model and its reload from `saved_dir`
    with plain transformers (`load_causal_lm`), on one prompt."""
    import torch

    from stemqa.models import load_causal_lm, load_tokenizer

    ids = load_tokenizer(str(saved_dir))(text, return_tensors="pt").input_ids
    reloaded = load_causal_lm(str(saved_dir))
    with torch.no_grad():
        a = model(ids.to(model.device)).logits.float().cpu()
        b = reloaded(ids.to(reloaded.device)).logits.float().cpu()
    return float((a - b).abs().max())


def dir_size_mb(path: Path) -> float:
    """Size on disk of the weights (safetensors files) in a model directory, in MB (1e6 bytes)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e6


def quantize(qcfg: QuantConfig, model_dir: str, calib_records: Sequence[MCQ], out_dir: Path) -> dict:
    """Quantize the model in `model_dir` with `qcfg.method`; save it to `out_dir`; return what was done.

    Returns {"model_dir", "method", "bits", "act_bits", "group_size", "calibration_samples", "wall_s",
    "size_mb", "source_model", "reload_max_abs_diff"} (wall_s: quantize + save, without the reload check);
    the same dict is written to `out_dir/stemqa_quant.json`. Raises QuantError (bad settings), GroupSizeError
    (naming the layers), UnsupportedMethodError (naming what this machine lacks).
    """
    from stemqa.models import resolve_model

    method = get_method(qcfg)
    src = resolve_model(str(model_dir))
    texts = calibration_texts(calib_records, qcfg.calibration_samples, qcfg.seed) if method.calibrated else []
    out_dir = Path(out_dir)
    # Write to a temporary sibling and move into place, so a failed run never leaves a half-written model.
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        model = method.run(qcfg, src, texts, tmp)
        wall_s = time.perf_counter() - start
        reload_diff = reload_max_abs_diff(model, tmp, texts[0] if texts else PROBE) if qcfg.verify_reload else None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del model
    result = {
        "model_dir": str(out_dir.resolve()), "method": qcfg.method, "bits": method.bits(qcfg),
        "act_bits": method.act_bits(qcfg), "group_size": method.group_size(qcfg),
        "calibration_samples": len(texts), "wall_s": round(wall_s, 3), "size_mb": round(dir_size_mb(tmp), 3),
        "source_model": str(src), "reload_max_abs_diff": reload_diff,
    }
    if reload_diff is not None and reload_diff > RELOAD_TOLERANCE:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantError(f"{qcfg.method}: the saved model does not reproduce the quantized model's logits "
                         f"(max |diff| {reload_diff:.3g} > {RELOAD_TOLERANCE}); not keeping {out_dir}")
    (tmp / META_FILE).write_text(json.dumps(result, indent=2))
    _replace_model_files(tmp, out_dir)
    return result


def _replace_model_files(new: Path, out_dir: Path) -> None:
    """Move the new model's files into out_dir, dropping an older model's weights (shard counts may differ)
    but leaving any other files of out_dir (it may be a pipeline stage directory) alone."""
    for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        old.unlink()
    for item in new.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    new.rmdir()
