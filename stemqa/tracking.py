"""Experiment tracking: every stage's metrics, per step, to the run directory and to the configured trackers.

    log_stage(run, "sft", metrics, cfg)   ->  <run>/sft/metrics.jsonl  (always: nothing is lost without trackers)
                                           +  MLflow (local file store <storage>/mlruns by default, or a URI)
                                           +  TensorBoard event files (<run>/tensorboard/<stage>)
                                           +  Weights & Biases (offline by default) when configured

A stage's metrics are the dict it records in the manifest; its per-step series are `losses` (train loss per
optimizer step, SFT and DPO) and `evals` (DPO validation {step, reward_accuracy, reward_margin, loss}).
Logging happens on the driver after the stage, from those series with their real step numbers: Train V2 has no
tracker callback (Ray's docs say to call the tracker from the train function), and logging from the driver keeps
tracker clients and their credentials off the workers. Sweeps use Ray Tune's own logger callbacks
(`tune_callbacks`). MLflow runs of one stemqa run share a parent run named after it, one child per stage.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

METRICS_FILE = "metrics.jsonl"


from stemqa.config.schema import TrackingConfig  # noqa: E402  (the section lives in the one config tree)


# ---------------------------------------------------------------- a stage's metrics -> rows per step
def _scalar(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def stage_rows(metrics: dict) -> list[dict]:
    """Rows {"step", <name>: value, ...}: one per train step, one per eval, then {"step": None, scalars...}."""
    rows: dict[int, dict] = {}
    for i, loss in enumerate(metrics.get("losses") or [], start=1):
        if _scalar(loss) is not None:
            rows.setdefault(i, {})["train/loss"] = float(loss)
    for ev in metrics.get("evals") or []:
        vals = {f"val/{k}": float(v) for k, v in ev.items() if k != "step" and _scalar(v) is not None}
        rows.setdefault(int(ev["step"]), {}).update(vals)
    out = [{"step": s, **vals} for s, vals in sorted(rows.items())]
    flat = _params({k: v for k, v in metrics.items() if k not in ("losses", "evals")})  # nested dicts -> a.b
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


def _log_mlflow(cfg: TrackingConfig, run_path: Path, run_id: str, stage: str, rows: list[dict], config: dict):
    if (cfg.mlflow_uri or "file:").startswith("file:"):
        # MLflow 3 refuses its file store unless told (it prefers a database); a file store needs no server,
        # which is what this default is for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(cfg, run_path))
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.stemqa_run = '{run_id}' and tags.stemqa_stage = '-'")
    parent = found[0].info.run_id if found else client.create_run(
        exp_id, run_name=run_id, tags={"stemqa_run": run_id, "stemqa_stage": "-"}).info.run_id
    child = client.create_run(exp_id, run_name=f"{run_id}/{stage}", tags={
        "stemqa_run": run_id, "stemqa_stage": stage, "mlflow.parentRunId": parent}).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, r["step"]) for r in rows if r["step"] is not None
               for k, v in r.items() if k != "step"]
    metrics += [Metric(k, v, now, 0) for r in rows if r["step"] is None for k, v in r.items() if k != "step"]
    params = [Param(k[:250], str(v)[:6000]) for k, v in _params(config).items()]
    for i in range(0, len(metrics), 1000):  # MLflow's limits per batch: 1000 metrics, 100 params
        client.log_batch(child, metrics=metrics[i:i + 1000])
    for i in range(0, len(params), 100):
        client.log_batch(child, params=params[i:i + 100])
    client.set_terminated(child)
    return child


def _log_tensorboard(run_path: Path, stage: str, rows: list[dict]) -> Path:
    from tensorboardX import SummaryWriter

    logdir = Path(run_path) / "tensorboard" / stage
    with SummaryWriter(str(logdir)) as w:
        for r in rows:
            for k, v in r.items():
                if k != "step":
                    w.add_scalar(k if r["step"] is not None else f"final/{k}", v, r["step"] or 0)
    return logdir


def _log_wandb(cfg: TrackingConfig, run_path: Path, run_id: str, stage: str, rows: list[dict], config: dict):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("tracking.backends includes 'wandb' but the wandb package is not installed "
                           "(pip install wandb, or drop 'wandb' from tracking.backends)") from e
    r = wandb.init(project=cfg.experiment, entity=cfg.wandb_entity, mode=cfg.wandb_mode, group=run_id,
                   name=f"{run_id}/{stage}", dir=str(run_path), config=_params(config), reinit="create_new")
    for row in rows:
        vals = {k: v for k, v in row.items() if k != "step"}
        if row["step"] is None:
            r.summary.update(vals)
        else:
            r.log(vals, step=row["step"])
    r.finish()


def log_stage(run, stage: str, metrics: dict, cfg: Optional[TrackingConfig] = None,
              config: Optional[dict] = None) -> Path:
    """Write <run>/<stage>/metrics.jsonl from the stage's metrics, then log them to each configured tracker.

    `run` is a `stemqa.runs.Run`; `config` the stage's config (logged as params). Returns the jsonl path. A
    tracker that fails (server down, package missing) raises after the jsonl is written.
    """
    cfg = cfg or TrackingConfig()
    if stage == "eval":  # the per-subject accuracies live in the stage's files, not in its manifest metrics
        metrics = {**eval_per_subject(run.stage_dir(stage)), **metrics}
    rows = stage_rows(metrics)
    path = run.stage_dir(stage) / METRICS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    for backend in cfg.backends:
        if backend == "mlflow":
            _log_mlflow(cfg, run.path, run.id, stage, rows, config or {})
        elif backend == "tensorboard":
            _log_tensorboard(run.path, stage, rows)
        elif backend == "wandb":
            _log_wandb(cfg, run.path, run.id, stage, rows, config or {})
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
