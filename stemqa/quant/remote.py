"""`quantize_remote`: the same `quantize`, run as a Ray task holding `qcfg.num_cpus` CPUs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from stemqa.config.schema import QuantConfig
from stemqa.data.mcq import MCQ
from stemqa.models import ModelLoadError
from stemqa.quant.errors import QuantError


def _quantize_task(qcfg: QuantConfig, model_dir: str, calib_records: list, out_dir: str) -> dict:
    import torch

    from stemqa.quant.run import quantize

    # Match torch's threads to the CPUs this task holds, so it does not oversubscribe a small machine.
    torch.set_num_threads(max(1, int(qcfg.num_cpus)))
    return quantize(qcfg, model_dir, calib_records, Path(out_dir))


def quantize_remote(qcfg: QuantConfig, model_dir: str, calib_records: Sequence[MCQ], out_dir: Path,
                    wait: bool = True):
    """Run `quantize` as a Ray task (Ray must be initialised); returns its result dict, or the ObjectRef
    when `wait` is False. Errors (GroupSizeError, UnsupportedMethodError, ...) re-raise as themselves."""
    import ray

    task = ray.remote(num_cpus=qcfg.num_cpus, max_retries=0)(_quantize_task)
    ref = task.remote(qcfg, str(model_dir), list(calib_records), str(out_dir))
    if not wait:
        return ref
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        # Hand the caller the stage's own clear error, not Ray's wrapper with a remote traceback.
        if isinstance(getattr(e, "cause", None), (QuantError, ModelLoadError)):
            raise e.cause from None
        raise
