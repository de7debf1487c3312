"""The stage contract: what every stage of stemqa is, whoever runs it (the pipeline, `stemqa <stage>`,
`python -m jobs.<stage>` under `ray job submit`, a Tune trial).

A stage is one module of stemqa/stages with a `STAGE` object (a `Stage` subclass) and a config section of the
same name in `stemqa.config.schema.StemqaConfig`. It says:

- what it reads: its `Inputs` (a pydantic model of paths and names), made either from the command line
  (`add_arguments` / `inputs_from_args`: files given, else the config) or from a pipeline run
  (`inputs_from_run`: the artifacts earlier stages recorded in the manifest);
- `run(ctx, inputs) -> StageResult`: the work, into `ctx.out_dir`; the result is typed: a one-line summary,
  scalar metrics, artifacts (name -> path) and, for training stages, the per-step history file rank 0 wrote;
- how it is recorded: `record(rec, result)` puts the artifacts and metrics in the run's manifest (the default
  does that for every stage; the inputs recorded are `manifest_inputs`);
- for sweeps (stages that have them): `Report` (the metrics every trial report carries; a sweep's metric must
  be one of its fields), `default_metric`, `trial_config`, `trial_cpus`, `prepare_trials` and
  `in_process_problem` (whether a trial may train in its own Tune trial process).

`record_stage` below runs a stage inside a run: manifest entry, tracker runs, metrics.jsonl, failure marking.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field

from stemqa.config.schema import StemqaConfig
from stemqa.progress import Progress
from stemqa.runs import Run
from stemqa.train.loop import TrainHooks


class StageInputError(ValueError):
    """A stage cannot find or accept what it reads (a missing earlier artifact, a bad file argument)."""


class StageResult(BaseModel):
    """What a stage returns: the pipeline prints `summary`; `metrics` and `artifacts` go into the manifest."""

    model_config = ConfigDict(extra="forbid")
    summary: str = Field(description="One line for the pipeline's table.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Scalars (and small mappings).")
    artifacts: dict[str, str] = Field(default_factory=dict, description="Name -> path of what the stage produced.")
    history: Optional[str] = Field(None, description="Per-step history file (training stages; stemqa.train.history).")


@dataclass
class StageContext:
    """Where and how a stage runs."""

    cfg: StemqaConfig
    out_dir: Path
    data_root: Path
    run: Optional[Run] = None  # the run it is part of, if any (its earlier stages' artifacts)
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))
    tracking: Any = None  # stemqa.tracking.LiveTarget: the stage's tracker runs, for Train workers to log into
    hooks: TrainHooks = field(default_factory=TrainHooks)  # fault injection, sweep reports
    callbacks: list = field(default_factory=list)  # Ray Train callbacks (a Tune trial's TuneReportCallback)
    train_in_process: bool = False  # a sweep trial with trial_mode local: train in this process (no worker group)


class Stage:
    name: ClassVar[str]
    Inputs: ClassVar[type[BaseModel]]
    description: ClassVar[str] = ""  # one line for `stemqa --help`
    uses_ray: ClassVar[bool] = True  # the CLI connects to Ray before running it
    rerun_on_resume: ClassVar[bool] = False  # serve: (re)deployed on every pipeline run, never "done earlier"
    # sweeps
    Report: ClassVar[Optional[type[BaseModel]]] = None
    default_metric: ClassVar[Optional[tuple[str, str]]] = None
    sweep_columns: ClassVar[list[str]] = []  # final metrics shown beside the target metric in results.csv
    sweep_curve: ClassVar[Optional[str]] = None  # reported metric plotted over steps per trial
    fault_injection: ClassVar[bool] = False  # trials may inject a worker crash (trial.fail_at_step)

    # ---- config
    def section(self, cfg: StemqaConfig) -> BaseModel:
        return getattr(cfg, self.name)

    def enabled(self, cfg: StemqaConfig) -> bool:
        return bool(getattr(self.section(cfg), "enabled", True))

    # ---- inputs
    def add_arguments(self, parser) -> None:
        """The stage's own command-line options (besides --config/--set/--run/--out/--address)."""

    def inputs_from_args(self, args, ctx: StageContext) -> BaseModel:
        raise NotImplementedError

    def inputs_from_run(self, ctx: StageContext) -> BaseModel:
        raise NotImplementedError

    def manifest_inputs(self, inputs: BaseModel, run: Run) -> dict:
        """The inputs as recorded: paths inside the run relative to it (what `stemqa runs show` links)."""
        def rel(v):
            if isinstance(v, (str, Path)) and os.path.isabs(str(v)) and Path(v).is_relative_to(run.path):
                return os.path.relpath(v, run.path)
            return v
        return {k: rel(v) for k, v in inputs.model_dump(mode="json").items() if v is not None}

    # ---- work
    def run(self, ctx: StageContext, inputs: BaseModel) -> StageResult:
        raise NotImplementedError

    def record(self, rec, result: StageResult) -> None:
        for key, path in result.artifacts.items():
            rec.add_artifact(key, path)
        if result.history:
            rec.add_artifact("history", result.history)
        rec.add_metrics(**result.metrics)

    def show(self, result: StageResult) -> None:
        """What the command prints when the stage is done (stdout; progress went to stderr)."""
        import json

        print(json.dumps(result.model_dump(), indent=2, default=str))

    # ---- extra actions of the command (rag: query, tune-embedder); None = run the stage
    def command(self, args, cfg: StemqaConfig) -> Optional[int]:
        return None

    # ---- sweeps
    def trial_config(self, cfg: StemqaConfig, hooks: TrainHooks, trial_cpus: float) -> StemqaConfig:
        """A trial's config, adjusted to run inside a Tune trial (e.g. no recovery from an injected crash)."""
        return cfg

    def trial_cpus(self, cfg: StemqaConfig, trial_cpus: float) -> tuple[float, float]:
        """(CPUs the trial process holds, CPUs its Ray workers ask for besides)."""
        return trial_cpus, 0.0

    def sweep_problem(self, cfg: StemqaConfig, sweep) -> Optional[str]:
        """Why a sweep of this stage with these settings cannot work, or None."""
        return None

    def in_process_problem(self, cfg: StemqaConfig) -> Optional[str]:
        """Why a trial with config `cfg` cannot do its work in its own Tune trial process (sweeps' trial_mode
        local), or None when it can."""
        return f"{self.name} trials run no training loop"

    def prepare_trials(self, ctx: StageContext, inputs: BaseModel, sweep=None) -> BaseModel:
        """Work every trial would repeat, done once by the sweep's driver (DPO: the reference log-probs); `sweep`
        is the sweep's settings (stemqa.tune.space.SweepConfig)."""
        return inputs


def artifact(run: Run, *candidates: tuple[str, str]) -> Optional[str]:
    """The first (stage, artifact) of `candidates` that a finished stage of `run` recorded, as a path."""
    for stage, name in candidates:
        if run.stage_status(stage) == "done" and name in run.manifest()["stages"][stage].get("artifacts", {}):
            return str(run.artifact(stage, name))
    return None


def require(path: Optional[str], stage: str, what: str) -> str:
    if path is None:
        raise StageInputError(f"stage {stage} needs {what}, which no finished stage of this run recorded "
                         "(is the stage that makes it in `stages` and enabled?)")
    return path


def record_stage(stage: Stage, ctx: StageContext, inputs: BaseModel) -> StageResult:
    """Run `stage` as part of `ctx.run`: its manifest entry (running, then done or failed with the error), its
    tracker runs (opened first, so Train workers log into them live; marked failed on an error), and
    <run>/<stage>/metrics.jsonl."""
    from stemqa.tracking import log_stage, mark_failed, open_stage
    from stemqa.train.history import read_history

    run, cfg = ctx.run, ctx.cfg
    config = stage.section(cfg).model_dump(mode="json")
    live = open_stage(run, stage.name, cfg.tracking, config)
    try:
        with run.stage(stage.name, inputs=stage.manifest_inputs(inputs, run), config=config) as rec:
            ctx.out_dir, ctx.tracking = rec.dir, live
            result = stage.run(ctx, inputs)
            stage.record(rec, result)
    except BaseException:
        mark_failed(live)
        raise
    log_stage(run, stage.name, result.metrics, cfg.tracking, config, live, read_history(result.history))
    return result


class TrainStage(Stage):
    """What the training stages (sft, dpo) share: Ray Train options from the context, sweeps' trial settings."""

    fault_injection = True

    def options(self, ctx: StageContext):
        from stemqa.train.loop import TrainOptions

        return TrainOptions(hooks=ctx.hooks, callbacks=list(ctx.callbacks), tracking=ctx.tracking,
                            progress=ctx.progress.remote(self.name, unit="steps"), in_process=ctx.train_in_process)

    def trial_config(self, cfg: StemqaConfig, hooks: TrainHooks, trial_cpus: float) -> StemqaConfig:
        if hooks.fail_at_step:  # the injected worker death must fail the trial, not be recovered from
            self.section(cfg).resources.max_failures = 0
        return cfg

    def trial_cpus(self, cfg: StemqaConfig, trial_cpus: float) -> tuple[float, float]:
        res = self.section(cfg).resources
        return trial_cpus, res.num_workers * res.cpus_per_worker

    def in_process_problem(self, cfg: StemqaConfig) -> Optional[str]:
        # In process, the loop is rank 0 of 1 on the trial's CPUs; data parallelism needs Train's worker group,
        # a GPU a trial actor that holds one (Tune gives the trial CPUs only here).
        res = self.section(cfg).resources
        if res.num_workers > 1:
            return f"{self.name}.resources.num_workers={res.num_workers} (in process, a trial trains one rank)"
        if res.use_gpu:
            return f"{self.name}.resources.use_gpu=true (in process, a trial trains on CPU)"
        return None

    def sweep_problem(self, cfg: StemqaConfig, sweep) -> Optional[str]:
        if sweep.scheduler.type == "asha" and self.section(cfg).eval_every is None:
            return (f"ASHA compares trials at their validations, and {self.name}.eval_every is null (validation after "
                    f"the last step only): set it in `fixed:`, e.g. {self.name}.eval_every: 1")
        return None

    @staticmethod
    def result(train, summary: str, **artifacts) -> StageResult:
        """A training run's `TrainResult` as the stage's result: the model, the history, the final metrics."""
        metrics = {k: v for k, v in train.metrics.items() if k != "history"}
        return StageResult(summary=summary, metrics=metrics, artifacts={"model": train.model_dir, **artifacts},
                           history=train.history_path)
