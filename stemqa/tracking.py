"""Experiment tracking: every stage's metrics, per step, to the run directory and to the configured trackers.

    live = open_stage(run, "sft", cfg, config)   (driver, before the stage: the tracker runs exist while it runs)
    StepLogger.open(live) ... .log(step, {...})   (Train worker rank 0: each optimizer step and each eval, live)
    log_stage(run, "sft", metrics, cfg, config, live)
                                           ->  <run>/sft/metrics.jsonl  (always: nothing is lost without trackers)
                                           +  MLflow (local file store <storage>/mlruns by default, or a URI)
                                           +  TensorBoard event files (<run>/tensorboard/<stage>)
                                           +  Weights & Biases (offline by default) when configured

A stage's metrics are the scalars it records in the manifest; a training stage's per-step series (train loss per
optimizer step, validations) are its history file (`stemqa.train.history`, <run>/<stage>/history.jsonl).
Train V2 has no tracker callback; Ray's docs say to call the tracker from the train function, which is what
StepLogger does with Ray's own `setup_mlflow` / `setup_wandb` (rank 0 only), so the curves grow while a job runs.
The driver then adds the stage's summary to the same tracker runs. Stages without a Train loop, and callers
that pass no `live`, get their per-step rows logged by the driver after the stage. Sweeps register Ray Tune's
own logger callbacks (`tune_callbacks`): one tracker run per trial, every report a step. MLflow runs of one stemqa run share a parent run named after it, one child
per stage.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

METRICS_FILE = "metrics.jsonl"


from stemqa.config.schema import TrackingConfig  # noqa: E402  (the section lives in the one config tree)
from stemqa.train.history import TrainHistory  # noqa: E402


# ---------------------------------------------------------------- a stage's metrics -> rows per step
def _scalar(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def stage_rows(metrics: dict, history: Optional[TrainHistory] = None) -> list[dict]:
    """Rows {"step", <name>: value, ...}: one per train step and eval of the stage's history (train/loss,
    val/<metric>), then {"step": None, scalars...} with the stage's metrics."""
    out = history.tracker_rows() if history is not None else []
    flat = _params(metrics)  # nested dicts -> a.b
    # a stage's final metrics may carry its last "step"; the summary row's step must stay None
    summary = {k.replace("/", "."): _scalar(v) for k, v in flat.items() if _scalar(v) is not None and k != "step"}
    if summary:
        out.append({"step": None, **summary})
    return out


def eval_per_subject(stage_dir) -> dict:
    """{"<model>/<set>/<subject>": accuracy} from an eval stage's <model>/<set>/metrics.json files."""
    out = {}
    for f in sorted(Path(stage_dir).glob("*/*/metrics.json")):
        res = json.loads(f.read_text())
        for subject, v in res.get("per_subject", {}).items():
            out[f"{f.parent.parent.name}/{f.parent.name}/{subject}"] = v["accuracy"]
    return out


def read_rows(run_path, stage: str) -> list[dict]:
    path = Path(run_path) / stage / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- trackers
def _params(config: dict, prefix: str = "") -> dict:
    """Flattened scalar config values (MLflow params, W&B config)."""
    out = {}
    for k, v in (config or {}).items():
        if isinstance(v, dict):
            out.update(_params(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def mlflow_uri(cfg: TrackingConfig, run_path: Path) -> str:
    return cfg.mlflow_uri or (Path(run_path).resolve().parent / "mlruns").as_uri()


def _mlflow_client(cfg: TrackingConfig, run_path: Path):
    if (cfg.mlflow_uri or "file:").startswith("file:"):
        # MLflow 3 refuses its file store unless told (it prefers a database); a file store needs no server,
        # which is what this default is for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri(cfg, run_path))


def _mlflow_child(cfg: TrackingConfig, run_path: Path, run_id: str, stage: str, config: dict) -> tuple[str, str]:
    """Create the stage's MLflow run (a child of the stemqa run's parent run) with its params: (experiment, run) ids."""
    from mlflow.entities import Param

    client = _mlflow_client(cfg, run_path)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.stemqa_run = '{run_id}' and tags.stemqa_stage = '-'")
    parent = found[0].info.run_id if found else client.create_run(
        exp_id, run_name=run_id, tags={"stemqa_run": run_id, "stemqa_stage": "-"}).info.run_id
    child = client.create_run(exp_id, run_name=f"{run_id}/{stage}", tags={
        "stemqa_run": run_id, "stemqa_stage": stage, "mlflow.parentRunId": parent}).info.run_id
    params = [Param(k[:250], str(v)[:6000]) for k, v in _params(config).items()]
    for i in range(0, len(params), 100):  # MLflow's limit per batch: 100 params
        client.log_batch(child, params=params[i:i + 100])
    return exp_id, child


def _log_mlflow(cfg: TrackingConfig, run_path: Path, child: str, rows: list[dict]) -> str:
    from mlflow.entities import Metric

    client = _mlflow_client(cfg, run_path)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, r["step"]) for r in rows if r["step"] is not None
               for k, v in r.items() if k != "step"]
    metrics += [Metric(k, v, now, 0) for r in rows if r["step"] is None for k, v in r.items() if k != "step"]
    for i in range(0, len(metrics), 1000):  # MLflow's limit per batch: 1000 metrics
        client.log_batch(child, metrics=metrics[i:i + 1000])
    client.set_terminated(child)
    return child


def _log_tensorboard(run_path: Path, stage: str, rows: list[dict]) -> Path:
    from tensorboardX import SummaryWriter

    logdir = Path(run_path) / "tensorboard" / stage
    with SummaryWriter(str(logdir), filename_suffix=f".stage.{os.getpid()}") as w:
        for r in rows:
            for k, v in r.items():
                if k != "step":
                    w.add_scalar(k if r["step"] is not None else f"final/{k}", v, r["step"] or 0)
    return logdir


def _log_wandb(cfg: TrackingConfig, run_path: Path, run_id: str, stage: str, rows: list[dict], config: dict,
               wandb_id: Optional[str] = None):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("tracking.backends includes 'wandb' but the wandb package is not installed "
                           "(pip install wandb, or drop 'wandb' from tracking.backends)") from e
    # with a live id the workers' run is continued (its steps are already there); W&B merges them on sync
    r = wandb.init(project=cfg.experiment, entity=cfg.wandb_entity, mode=cfg.wandb_mode, group=run_id,
                   name=f"{run_id}/{stage}", dir=str(run_path), config=_params(config), reinit="create_new",
                   id=wandb_id, resume="allow" if wandb_id else None)
    for row in rows:
        vals = {k: v for k, v in row.items() if k != "step"}
        if row["step"] is None:
            r.summary.update(vals)
        else:
            r.log(vals, step=row["step"])
    r.finish()


# ---------------------------------------------------------------- live: a Train worker logs while it trains
class LiveTarget(BaseModel):
    """Where a stage's Train worker logs its steps (made on the driver by `open_stage`, sent in the loop config)."""

    model_config = ConfigDict(extra="forbid")
    backends: list[str] = Field(default_factory=list)
    experiment: str = "stemqa"
    mlflow_uri: Optional[str] = None
    mlflow_experiment_id: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    wandb_id: Optional[str] = None
    wandb_mode: str = "offline"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_name: Optional[str] = None
    wandb_dir: Optional[str] = None


def open_stage(run, stage: str, cfg: Optional[TrackingConfig] = None, config: Optional[dict] = None) -> LiveTarget:
    """Create the stage's tracker runs before it starts, so a Train worker can log into them step by step."""
    cfg = cfg or TrackingConfig()
    live = LiveTarget(backends=list(cfg.backends), experiment=cfg.experiment)
    if "mlflow" in cfg.backends:
        live.mlflow_uri = mlflow_uri(cfg, run.path)
        live.mlflow_experiment_id, live.mlflow_run_id = _mlflow_child(cfg, run.path, run.id, stage, config or {})
    if "tensorboard" in cfg.backends:
        live.tensorboard_dir = str(Path(run.path).resolve() / "tensorboard" / stage)
    if "wandb" in cfg.backends:
        live.wandb_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits; ours so both sides share it
        live.wandb_mode, live.wandb_entity = cfg.wandb_mode, cfg.wandb_entity
        live.wandb_group, live.wandb_name, live.wandb_dir = run.id, f"{run.id}/{stage}", str(run.path)
    return live


def mark_failed(live: Optional[LiveTarget]) -> None:
    """The stage crashed: its MLflow run says FAILED instead of staying RUNNING (the other trackers need nothing)."""
    if live and live.mlflow_run_id:
        _mlflow_client(TrackingConfig(mlflow_uri=live.mlflow_uri), Path(".")).set_terminated(live.mlflow_run_id,
                                                                                             "FAILED")


def end_run(run, cfg: Optional[TrackingConfig] = None, status: str = "FINISHED") -> None:
    """The stemqa run is over: its MLflow parent run stops saying RUNNING."""
    cfg = cfg or TrackingConfig()
    if "mlflow" not in cfg.backends:
        return
    client = _mlflow_client(cfg, run.path)
    exp = client.get_experiment_by_name(cfg.experiment)
    found = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.stemqa_run = '{run.id}' and tags.stemqa_stage = '-'")) if exp else []
    for parent in found:
        client.set_terminated(parent.info.run_id, status)


class StepLogger:
    """Per-step metrics from a Train worker to the stage's trackers, through Ray's `setup_mlflow` / `setup_wandb`.

    Only rank 0 logs (`StepLogger.open(target, rank)` gives a no-op logger elsewhere). After a worker restart the
    steps between the last checkpoint and the crash are logged again with the same step numbers.
    """

    def __init__(self):
        self._mlflow = self._tb = self._wandb = None

    @classmethod
    def open(cls, target: Optional[dict], rank: int) -> "StepLogger":
        self = cls()
        if not target or rank != 0:
            return self
        live = LiveTarget.model_validate(target)
        if live.mlflow_run_id:
            from ray.air.integrations.mlflow import setup_mlflow

            if live.mlflow_uri.startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            # mlflow.start_run (called by setup_mlflow) continues the run named in MLFLOW_RUN_ID: the driver's child
            os.environ["MLFLOW_RUN_ID"] = live.mlflow_run_id
            self._mlflow = setup_mlflow(tracking_uri=live.mlflow_uri, experiment_id=live.mlflow_experiment_id,
                                        rank_zero_only=False)
        if live.tensorboard_dir:
            from tensorboardX import SummaryWriter

            # event files are named by the second and host: a suffix keeps the driver's summary from replacing them
            self._tb = SummaryWriter(live.tensorboard_dir, flush_secs=5, filename_suffix=f".steps.{os.getpid()}")
        if live.wandb_id:
            from ray.air.integrations.wandb import setup_wandb

            os.environ["WANDB_MODE"] = live.wandb_mode  # setup_wandb looks for an API key unless offline
            self._wandb = setup_wandb(project=live.experiment, entity=live.wandb_entity, group=live.wandb_group,
                                      name=live.wandb_name, id=live.wandb_id, resume="allow", dir=live.wandb_dir,
                                      mode=live.wandb_mode,
                                      rank_zero_only=False)
        return self

    def log(self, step: int, metrics: dict) -> None:
        vals = {k: float(v) for k, v in metrics.items() if _scalar(v) is not None}
        if self._mlflow is not None:
            self._mlflow.log_metrics(vals, step=step)
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(vals, step=step)

    def close(self) -> None:
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def log_stage(run, stage: str, metrics: dict, cfg: Optional[TrackingConfig] = None,
              config: Optional[dict] = None, live: Optional[LiveTarget] = None,
              history: Optional[TrainHistory] = None) -> Path:
    """Write <run>/<stage>/metrics.jsonl from the stage's metrics and history, then log them to each tracker.

    `run` is a `stemqa.runs.Run`; `config` the stage's config (logged as params); `live` the stage's tracker runs
    from `open_stage`: its Train workers logged the history's steps into them as they trained, so only the summary
    goes to the trackers from here. Returns the jsonl path. A tracker that fails (server down, package missing)
    raises after the jsonl is written.
    """
    cfg = cfg or TrackingConfig()
    if stage == "eval":  # the per-subject accuracies live in the stage's files, not in its manifest metrics
        metrics = {**eval_per_subject(run.stage_dir(stage)), **metrics}
    rows = stage_rows(metrics, history)
    path = run.stage_dir(stage) / METRICS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    to_log = [r for r in rows if r["step"] is None] if live is not None and history is not None else rows
    for backend in cfg.backends:
        if backend == "mlflow":
            child = live.mlflow_run_id if live and live.mlflow_run_id else \
                _mlflow_child(cfg, run.path, run.id, stage, config or {})[1]
            _log_mlflow(cfg, run.path, child, to_log)
        elif backend == "tensorboard":
            _log_tensorboard(run.path, stage, to_log)
        elif backend == "wandb":
            _log_wandb(cfg, run.path, run.id, stage, to_log, config or {}, live.wandb_id if live else None)
    return path


def tune_callbacks(cfg: Optional[TrackingConfig], storage_path: str) -> list:
    """Ray Tune's own logger callbacks for the configured trackers (for `tune.RunConfig(callbacks=...)`).
    TensorBoard needs none: Tune writes event files into each trial directory itself (tensorboardX installed)."""
    cfg = cfg or TrackingConfig()
    out = []
    if "mlflow" in cfg.backends:
        if not cfg.mlflow_uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = cfg.mlflow_uri or (Path(storage_path).expanduser().resolve() / "mlruns").as_uri()
        out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.experiment, save_artifact=False))
    if "wandb" in cfg.backends:
        from ray.air.integrations.wandb import WandbLoggerCallback

        os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
        out.append(WandbLoggerCallback(project=cfg.experiment, entity=cfg.wandb_entity))
    return out
