"""The run the training loop is part of: its rank, reports, checkpoints and where they are stored.

The one training loop (`stemqa.train.loop`, `stemqa.train.checkpoint`) asks `current()` instead of calling
`ray.train` directly, so that it can run two ways without a second loop:

- `RayTrainWorker` (the default): a Ray Train worker of a TorchTrainer; `ray.train`'s context, reports,
  checkpoints (uploaded by Ray Train into the run's storage) and collectives.
- `InTrial`: a sweep trial that trains in its own Tune trial process (`stemqa sweep`, `resources.trial_mode:
  local`; `run_in_trial` below). One rank on CPU; every report goes to Tune with `ray.tune.report` (what ASHA
  compares, as TuneReportCallback forwards rank 0's reports in a Train run); every checkpoint is copied into the
  directory a Ray Train run of the same name uses (`<out_dir>/ray/<run_name>`), with the same names and
  completion markers, so `checkpoint.latest_checkpoint` finds it when the trial is restarted (a restored sweep)
  exactly as it finds a Train run's.

Why a trial does not use Ray Train's own local mode (`ScalingConfig(num_workers=0)`, Ray 2.60), which also runs
the function in the calling process: inside a Tune trial `ray.train.report`, `get_context` and `get_checkpoint`
raise ("deprecated when running in a function passed to Ray Tune", `requires_train_worker(raise_in_tune_session=
True)` in ray/train/v2/_internal/util.py); its reports only keep the last metrics in the process (Tune never sees
them) and its checkpoints are not persisted; its context has no storage (`get_storage` raises
NotImplementedError). The one thing it would add, a process group for DeepSpeed, `run_in_trial` makes itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback adds to a report that carried a checkpoint


class RayTrainWorker:
    """A Ray Train worker: every call is `ray.train`'s."""

    def rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def world_size(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_size()

    def report(self, metrics: dict, checkpoint=None, checkpoint_dir_name: Optional[str] = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def broadcast_from_rank_zero(self, data: Any) -> Any:
        from ray.train.collective import broadcast_from_rank_zero

        return broadcast_from_rank_zero(data)

    def storage(self):
        """(pyarrow filesystem, path of this run's directory on it)."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        return storage.storage_filesystem, storage.experiment_fs_path


class InTrial:
    """The loop running in a Tune trial process, rank 0 of 1; checkpoints kept in `run_dir` (see the module)."""

    def __init__(self, run_dir: Path, keep: int = 1):
        self.run_dir, self.keep = Path(run_dir), keep
        self.metrics: dict = {}  # the last report's: the run's result, as a Train run's Result.metrics
        self.checkpoint = None  # the last checkpoint saved, or the one this attempt resumed from

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def broadcast_from_rank_zero(self, data: Any) -> Any:
        return data

    def storage(self):
        from pyarrow import fs

        return fs.LocalFileSystem(), str(self.run_dir)

    def get_checkpoint(self):
        if self.checkpoint is None:
            # A restarted trial (a restored sweep): the newest complete checkpoint its earlier attempt left, as
            # Ray Train hands a restarted run the last one its controller recorded.
            import ray.train

            from stemqa.train.checkpoint import newest_complete

            found = newest_complete(*self.storage())
            self.checkpoint = ray.train.Checkpoint(found) if found else None
        return self.checkpoint

    def report(self, metrics: dict, checkpoint=None, checkpoint_dir_name: Optional[str] = None) -> None:
        import ray.train
        import ray.tune

        metrics = dict(metrics)
        if checkpoint is not None:
            self._prune()
            dest = self.run_dir / checkpoint_dir_name
            # complete once the caller marks it uploaded after this returns (checkpoint.report_checkpoint), as
            # after Ray Train's upload; a trial killed while copying leaves an incomplete one, which is skipped
            shutil.copytree(checkpoint.path, dest)
            self.checkpoint = ray.train.Checkpoint(str(dest))
            metrics[CHECKPOINT_PATH_KEY] = str(dest)
        self.metrics = metrics
        ray.tune.report(metrics)  # blocks until the Tune driver takes it; ASHA may stop the trial here

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (CheckpointConfig(num_to_keep) of a Train run) and drop the
        rest, incomplete ones included. Called before the next checkpoint is written, so that a complete one is
        on disk while it is (hence up to `keep` + 1 between two checkpoints)."""
        from stemqa.train.checkpoint import CKPT_PREFIX, is_complete, step_of

        fs, _ = self.storage()
        dirs = sorted((p for p in self.run_dir.glob(f"{CKPT_PREFIX}*") if p.is_dir()),
                      key=lambda p: step_of(p.name), reverse=True)
        kept = [p for p in dirs if is_complete(fs, str(p))][:self.keep]
        for p in dirs:
            if p not in kept:
                shutil.rmtree(p, ignore_errors=True)


_RAY_TRAIN = RayTrainWorker()
_current: Optional[InTrial] = None


def current():
    """The run the calling code trains in: an `InTrial` while `run_in_trial` runs, else a Ray Train worker."""
    return _current or _RAY_TRAIN


def run_in_trial(train_fn: Callable[[dict], None], config: dict, run_dir: Path, keep: int = 1) -> dict:
    """Run the training loop `train_fn(config)` here, in a Tune trial process, instead of on a Train worker group;
    the last report's metrics (the final checkpoint's, as `fit` returns a Train run's).

    Saves a TorchTrainer's controller, placement group and worker process (start-up, imports of torch,
    transformers and DeepSpeed; 25-28 s a trial on 2 CPUs, benchmarks/BENCHMARKS.md); the caller (the sweep)
    makes the trial hold the CPUs that worker would have held."""
    import os

    import torch.distributed as dist

    global _current
    # what a launcher sets for rank 0 of 1 (DeepSpeed's engine asserts LOCAL_RANK is set); this process is the
    # trial's own actor, so its environment is ours to set
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        # DeepSpeed wants a process group even for one rank (Ray Train gives its workers one). An in-memory store:
        # nothing to connect to, no port to pick. Kept for the process's life: a reused trial actor's next trial
        # uses it again, and DeepSpeed's communication backend, made once per process, holds on to it.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    run = InTrial(run_dir, keep)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    _current = run
    try:
        train_fn(config)
    finally:  # also when ASHA stops the trial (SystemExit out of ray.tune.report) and the actor is reused
        _current = None
    return dict(run.metrics)
