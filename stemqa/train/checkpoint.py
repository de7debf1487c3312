"""Resumable checkpoints of the training loop, loaded without unpickling arbitrary objects, and the final model.

A checkpoint is one Ray Train checkpoint directory: every rank's DeepSpeed shards (tag `ds`), every rank's RNG
state (`rng_rank<r>.safetensors`) and rank 0's trainer state (`trainer_state.json`: step, history, method
state). Loading never runs pickled code: the trainer state is JSON, the RNG state safetensors, and DeepSpeed's
own files go through `torch.load(weights_only=True)` with an allowlist of the few plain DeepSpeed/torch types
they hold (`WeightsOnlyCheckpointEngine`); a file holding anything else fails to load instead of executing it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from stemqa.config.schema import LoraConfig
from stemqa.train import session
from stemqa.train.common import lora_peft_config, rank

TRAINER_STATE = "trainer_state.json"
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each Ray checkpoint directory
# Ray Train registers a checkpoint only when its controller polls the worker's report (every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A worker that dies inside that window leaves the checkpoint complete in
# storage but unknown to Ray, so the restart (or a re-submitted run) would resume from an older one or from
# scratch. So each rank marks its part uploaded once `report` returns, and `latest_checkpoint` takes the newest
# complete checkpoint in the run's storage when it is newer than Ray's.
CKPT_PREFIX = "checkpoint_step"
UPLOADED = "uploaded_rank{}"


# ---------------------------------------------------------------- loading DeepSpeed files without pickle
def deepspeed_safe_globals() -> list:
    """What DeepSpeed 0.19's checkpoints of our engines hold besides tensors and builtins (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0/2/3 checkpoints, full and LoRA): plain
    data types, no callables. torch.load(weights_only=True) refuses every other global."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_engine(engine) -> None:
    """Make `engine` load its checkpoint files with torch.load(weights_only=True) (DeepSpeed's own engine
    unpickles them with weights_only=False)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def save_rng(path: Path) -> None:
    """torch's and numpy's global RNG states as safetensors (numpy's MT19937 keys as a tensor)."""
    import torch
    from safetensors.torch import save_file

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    save_file({"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}, str(path),
              metadata={"numpy": json.dumps([name, int(pos), int(has_gauss), float(gauss)])})


def load_rng(path: Path) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        torch.set_rng_state(f.get_tensor("torch"))
        name, pos, has_gauss, gauss = json.loads(f.metadata()["numpy"])
        np.random.set_state((name, f.get_tensor("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, gauss))


# ---------------------------------------------------------------- save / find / restore
def report_checkpoint(engine, state: dict, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shards (+ RNG) into one Ray checkpoint with the trainer state."""
    import uuid

    import ray.train

    run = session.current()  # a Ray Train worker, or a sweep trial training in its own process
    r, world = rank(), run.world_size()
    # the step in the name orders checkpoints without opening them; the suffix keeps a re-run's apart
    name = run.broadcast_from_rank_zero(f"{CKPT_PREFIX}{state['step']:08d}_{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory(prefix="stemqa-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        save_rng(Path(d) / f"rng_rank{r}.safetensors")
        if r == 0:
            (Path(d) / TRAINER_STATE).write_text(json.dumps({**state, "world": world}))
        run.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
    fs, root = run.storage()
    with fs.open_output_stream(f"{root}/{name}/{UPLOADED.format(r)}"):
        pass  # this rank's files are in storage: `report` returns after its upload


def step_of(name: str) -> int:
    return int(name[len(CKPT_PREFIX):].split("_")[0]) if name.startswith(CKPT_PREFIX) else -1


def is_complete(fs, path: str) -> bool:
    """Whether the checkpoint directory `path` holds the trainer state and every rank's upload marker."""
    from pyarrow import fs as pafs

    files = {f.base_name for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
    if TRAINER_STATE not in files:
        return False
    with fs.open_input_stream(f"{path}/{TRAINER_STATE}") as f:
        world = json.loads(f.read()).get("world", 1)
    return all(UPLOADED.format(r) in files for r in range(world))


def latest_checkpoint():
    """Ray's last registered checkpoint, or a newer complete one in the run's storage (see above); rank 0
    chooses, so all ranks load the same one."""
    import ray.train

    run = session.current()
    known = run.get_checkpoint()
    fs, _ = run.storage()
    found = run.broadcast_from_rank_zero(_newer_complete(known) if rank() == 0 else None)
    return ray.train.Checkpoint(found, filesystem=fs) if found else known


def _newer_complete(known) -> Optional[str]:
    """The path of the newest checkpoint in storage that every rank finished uploading, if newer than `known`."""
    fs, root = session.current().storage()
    found = newest_complete(fs, root, above=step_of(Path(known.path).name) if known is not None else -1)
    if found:
        logging.getLogger(__name__).warning(
            "resuming from %s: complete in storage, newer than Ray's last registered checkpoint (%s)",
            Path(found).name, Path(known.path).name if known is not None else None)
    return found


def newest_complete(fs, root: str, above: int = -1) -> Optional[str]:
    """The path of the newest complete checkpoint in the run directory `root` whose step is above `above`."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for info in sorted((i for i in infos if i.type == pafs.FileType.Directory), key=lambda i: -step_of(i.base_name)):
        if step_of(info.base_name) <= above:
            return None
        if is_complete(fs, info.path):
            return info.path
    return None


def restore_checkpoint(engine) -> Optional[dict]:
    """Load the latest checkpoint into the engine (model, optimizer, scheduler, RNG); its trainer state."""
    ckpt = latest_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG)
        rng = Path(d) / f"rng_rank{rank()}.safetensors"
        if rng.exists():
            load_rng(rng)
        state = json.loads((Path(d) / TRAINER_STATE).read_text())
        state.pop("world", None)
        return state


# ---------------------------------------------------------------- the final model
def full_state_dict(engine, zero_stage: int) -> Optional[dict]:
    """The whole model's weights on rank 0 (None elsewhere); ZeRO-3 shards are gathered (a collective)."""
    module = engine.module
    is_zero = rank() == 0
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if is_zero else None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if is_zero else None


def save_hf_model(state: Optional[dict], base_path: str, lora: Optional[LoraConfig], out_dir: Path) -> Path:
    """Write `state` as a plain HF directory (safetensors, LoRA merged) + tokenizer, replacing `out_dir` atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_peft_config(lora))
    if state is not None:  # None: save the starting model itself (e.g. DPO that never beat it)
        model.load_state_dict(state, strict=True)
    if lora is not None:
        model = model.merge_and_unload()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
