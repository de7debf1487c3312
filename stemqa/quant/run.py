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
from stemqa.quant.methods import get_method

META_FILE = "stemqa_quant.json"


def dir_size_mb(path: Path) -> float:
    """Size on disk of the weights (safetensors files) in a model directory, in MB (1e6 bytes)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e6


def quantize(qcfg: QuantConfig, model_dir: str, calib_records: Sequence[MCQ], out_dir: Path) -> dict:
    """Quantize the model in `model_dir` with `qcfg.method`; save it to `out_dir`; return what was done.

    Returns {"model_dir", "method", "bits", "act_bits", "group_size", "calibration_samples", "wall_s",
    "size_mb"}; the same dict is written to `out_dir/stemqa_quant.json`. Raises QuantError (bad settings),
    GroupSizeError (naming the layers), UnsupportedMethodError (naming what this machine lacks).
    """
    from stemqa.models import resolve_model

    method = get_method(qcfg)
    src = resolve_model(str(model_dir))
    texts = calibration_texts(calib_records, qcfg.calibration_samples, qcfg.seed) if method.calibrated else []
    out_dir = Path(out_dir)
    # Write to a temporary sibling and rename, so a failed run never leaves a half-written model directory.
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        method.run(qcfg, src, texts, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall_s = time.perf_counter() - start
    result = {
        "model_dir": str(out_dir.resolve()), "method": qcfg.method, "bits": method.bits(qcfg),
        "act_bits": method.act_bits(qcfg), "group_size": method.group_size(qcfg),
        "calibration_samples": len(texts), "wall_s": round(wall_s, 3), "size_mb": round(dir_size_mb(tmp), 3),
        "source_model": str(src),
    }
    (tmp / META_FILE).write_text(json.dumps(result, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return result
