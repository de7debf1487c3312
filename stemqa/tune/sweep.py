"""`run_sweep`: a Ray Tune sweep whose trials are stemqa stage runs, with ASHA, failures kept, and resume.

Layout of a sweep directory (`out_dir`):

    space.json         the loaded space and base config (a restore must be of the same space)
    inputs/            what every trial reads (the stage's inputs): train records (sft), pairs + reference
                       log-probs (dpo), calibration and eval records (quant); made once by the driver
    tune/              Ray Tune's experiment (Tuner.restore resumes from here)
    trials/<id>/       each trial's Ray Train run (checkpoints) and, with keep_models, its model
    events.jsonl       driver-side trial events (start, complete, error) with times
    results.csv, best.yaml, plots/   written by `stemqa.tune.results` when the sweep ends

A trial runs the stage's own `run` (stemqa.stages) inside a Tune *function* trainable. For SFT/DPO, with
`resources.trial_mode` train, that is a Ray Train run (TorchTrainer + DeepSpeed) with `TuneReportCallback`
forwarding rank 0's reports to Tune (Train V2 cannot be given to the Tuner directly); with trial_mode local (auto
picks it when every trial trains one CPU worker) the same training loop runs in the trial process itself, which
holds the CPUs that worker would have held, reports to Tune with `ray.tune.report` and keeps its checkpoints
where the Train run would (stemqa.train.session): no controller, placement group or worker process per trial.
The training loop reports the stage's `Report` at each validation (`<stage>.eval_every`), which is what ASHA
compares. Nothing here knows a stage by name: the stage says what its trials report, what they hold, whether
they may train in process and what is prepared once. A trial that raises is recorded as ERROR with its error and
the others go on; each trial is logged to the configured trackers (Tune's logger callbacks).
A restarted unfinished trial keeps its id, hence its directory, so its training (Ray Train run or in process)
resumes from its last checkpoint rather than from step 0.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from stemqa.config import ConfigError
from stemqa.progress import Progress
from stemqa.stages.base import StageContext
from stemqa.tracking import tune_callbacks
from stemqa.train.loop import TrainHooks
from stemqa.tune.space import Space, flat_params, split_trial, sweepable_stage

# Ray Tune saves its experiment state at most every 10 s by default ("auto"); a driver killed inside that window
# would re-run trials that had finished. Saving every second costs little with tens of trials.
TUNE_ENV = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
EXPERIMENT = "tune"


# ---------------------------------------------------------------- inputs, made once by the driver
def stage_args(space: Space, argv: Optional[list[str]] = None):
    """The stage's own command-line options (`stemqa sweep sft --data F`), parsed; defaults when none."""
    import argparse

    p = argparse.ArgumentParser(prog=f"stemqa sweep {space.sweep.stage}", add_help=False)
    p.add_argument("--out", default=None)
    sweepable_stage(space.sweep.stage).add_arguments(p)
    return p.parse_args(argv or [])


def prepare_inputs(space: Space, out_dir: Path, args=None) -> dict:
    """What every trial reads, made once: the stage's inputs from its options (`args`, else defaults from the base
    config: data.train, data.preference, eval.sets, model.name) plus the work the stage does once for all trials
    (`Stage.prepare_trials`: DPO's reference log-probs, quant's eval sets). {"inputs", "trials_dir"}."""
    from stemqa.data.paths import data_root

    stage = sweepable_stage(space.sweep.stage)
    ctx = StageContext(space.base, Path(out_dir) / "inputs", data_root(space.base.data.root),
                       progress=Progress())
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        inputs = stage.prepare_trials(ctx, stage.inputs_from_args(args or stage_args(space), ctx), space.sweep)
    finally:
        ctx.progress.close()
    return {"inputs": inputs.model_dump(mode="json"), "trials_dir": str((Path(out_dir) / "trials").resolve())}


# ---------------------------------------------------------------- the trial
def run_trial(params: dict, space: Space, inputs: dict) -> None:
    """Tune function trainable: the stage's own `run` with this trial's config; its reports go to Tune as it
    trains (trial_mode train: a Ray Train run whose TuneReportCallback forwards them; local: the training loop
    runs here and reports to Tune itself, stemqa.train.session), its final metrics are the trial's last report."""
    import ray.tune

    from stemqa.data.paths import data_root

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(inputs["trials_dir"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "starts.jsonl", "a") as f:  # one line per (re)start: shows what a restore re-ran
        f.write(json.dumps({"t": t0, "pid": os.getpid()}) + "\n")
    _, switches = split_trial(flat_params(params))
    hooks = TrainHooks(fail_at_step=switches.get("fail_at_step"), report_evals=True)
    stage = sweepable_stage(space.sweep.stage)
    cfg = stage.trial_config(space.trial_config(params), hooks, space.sweep.resources.trial_cpus)
    local = space.trial_mode == "local"
    callbacks = []
    if not local:
        from ray.tune.integration.ray_train import TuneReportCallback

        _let_train_clean_up_stopped_runs()
        callbacks = [TuneReportCallback()]
    ctx = StageContext(cfg, trial_dir, data_root(cfg.data.root), hooks=hooks, callbacks=callbacks,
                       train_in_process=local)
    result = stage.run(ctx, stage.Inputs.model_validate(inputs["inputs"]))
    summary = {k: v for k, v in result.metrics.items() if not isinstance(v, (dict, list))}
    summary.update(trial_done=True, trial_wall_s=time.time() - t0, step=summary.get("steps", 1))
    ray.tune.report(summary)


def _let_train_clean_up_stopped_runs() -> None:
    """Give Ray Train's placement-group cleaner the address of this cluster.

    A trial that ASHA stops is killed, and its Train controller with it; the Train workers' placement group is
    then removed by a detached `PlacementGroupCleaner` that polls the controller through the State API. Without
    RAY_ADDRESS that API finds its cluster by looking for running GCS processes, and fails on a machine running
    several Ray instances ("Found multiple active Ray instances"); measured here: every stopped trial leaked its
    workers' CPUs and the sweep deadlocked after two stops. Train copies the variables named in
    ENV_VARS_TO_PROPAGATE from this process to the controller, whose runtime env the cleaner inherits; Ray
    offers no public way to add one, hence the addition to that set.
    """
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")


# ---------------------------------------------------------------- driver
class TrialProgress(Callback):
    """A line on the driver's terminal as each trial starts and ends: how many are done, the best so far."""

    def __init__(self, space: Space):
        self.space, self.best = space, None

    def _line(self, what: str, trials, trial) -> None:
        sw = self.space.sweep
        value = (trial.last_result or {}).get(sw.metric)
        if what == "completed" and isinstance(value, (int, float)):
            if self.best is None or (value < self.best if sw.mode == "min" else value > self.best):
                self.best = value
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        best = f"; best {sw.metric} {self.best:.4g}" if self.best is not None else ""
        print(f"[sweep] trial {trial.trial_id} {what}: {ended} finished, {running} running{best}",
              file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line("started", trials, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line("completed", trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line("failed", trials, trial)


class EventLog(Callback):
    """Tune callback writing trial starts, completions and errors (driver clock) to events.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _write(self, event: str, trial) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "event": event, "trial_id": trial.trial_id}) + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write("start", trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write("complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write("error", trial)


def trial_cpus(space: Space) -> tuple[float, float]:
    """(CPUs the trial process holds, CPUs its Ray workers or tasks ask for): a sliver for the trial, which only
    waits on its stage's Train workers (sft, dpo) or Ray tasks (quant). trial_mode local: the trial process does
    its worker's work, so it holds both (the same CPUs a trial takes either way, hence the same concurrency)."""
    own, workers = sweepable_stage(space.sweep.stage).trial_cpus(space.base, space.sweep.resources.trial_cpus)
    return (own + workers, 0.0) if space.trial_mode == "local" else (own, workers)


def check_fits(space: Space) -> None:
    """A trial whose CPUs exceed the cluster's would wait forever; say so before starting."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = sum(trial_cpus(space))
    if need > cpus + 1e-9:
        raise ConfigError(f"{space.path}: one trial needs {need:g} CPUs (the trial + its workers) but the cluster "
                          f"has {cpus:g}; lower the {space.sweep.stage} stage's resources")


def _trainable(space: Space, inputs: dict):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, space=space, inputs=inputs),
                               {"cpu": trial_cpus(space)[0]})


def _scheduler(space: Space):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=s.time_attr, metric=space.sweep.metric, mode=space.sweep.mode,
                         max_t=space.max_t(), grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def build_tuner(space: Space, out_dir: Path, inputs: dict, verbose: int = 1):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sw = space.sweep
    tune_config = tune.TuneConfig(
        scheduler=_scheduler(space), num_samples=sw.num_samples,
        # A search_alg given here ignores TuneConfig's max_concurrent_trials, so the generator gets it itself
        # (measured: without it all trials started at once and waited on each other's Train workers).
        search_alg=BasicVariantGenerator(random_state=sw.seed, max_concurrent=sw.resources.max_concurrent_trials),
        time_budget_s=sw.time_budget_s,
        # train: a fresh trial actor each time, as a stopped trial's actor dies with its nested Ray Train run.
        # local: trial actors are reused, so torch, transformers and DeepSpeed are imported (and DeepSpeed's
        # process group made) once per actor rather than once per trial. A trial ASHA stops leaves its actor at
        # a report (its thread exits there, see stemqa.train.session), so the next trial starts clean; an actor
        # whose trial crashed is replaced.
        reuse_actors=space.trial_mode == "local", trial_dirname_creator=lambda t: t.trial_id,
    )
    out_dir = Path(out_dir).resolve()
    # one tracker run per trial (MLflow beside the sweep directory, as a pipeline run's are beside the run)
    trackers = tune_callbacks(space.base.tracking, str(out_dir.parent))
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=str(out_dir), verbose=verbose,
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # a crash is recorded, not retried
        callbacks=[EventLog(out_dir / "events.jsonl"), TrialProgress(space), *trackers],
    )
    return tune.Tuner(_trainable(space, inputs), param_space=space.param_space(), tune_config=tune_config,
                      run_config=run_config)


def _space_record(space: Space) -> dict:
    """What a restore must match: the sweep and the trials' base config (cluster.* says where, not what)."""
    base = space.base.model_dump(mode="json")
    base.pop("cluster", None)
    return {"path": space.path, "sweep": space.sweep.model_dump(mode="json"), "base": base}


def run_sweep(space: Space, out_dir: Path, args=None, verbose: int = 1) -> dict:
    """Run (or resume) the sweep in `out_dir`; Ray must be initialised. `args`: the stage's own options
    (`stage_args`; default: the base config's data and model). Returns the summary of
    `stemqa.tune.results.write_results`: {"results_csv", "best_yaml", "best", "plots", "counts", "table"}.

    When `out_dir` holds a sweep of the same space, it resumes with `Tuner.restore`: finished and failed
    trials are kept as they are, unfinished ones run again (their Ray Train runs resume from checkpoints).
    """
    from ray import tune

    from stemqa.tune.results import write_results

    for k, v in TUNE_ENV.items():
        os.environ.setdefault(k, v)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path, exp_dir = out_dir / "space.json", out_dir / EXPERIMENT
    record = _space_record(space)
    if record_path.exists() and tune.Tuner.can_restore(str(exp_dir)):
        saved = json.loads(record_path.read_text())
        if (saved["sweep"], saved["base"]) != (record["sweep"], record["base"]):
            raise ConfigError(f"{out_dir} holds a sweep of another space or config ({saved['path']}); "
                              "use a new output directory")
        inputs = json.loads((out_dir / "inputs.json").read_text())
        check_fits(space)
        # Tuner.restore brings the trackers' Tune callbacks back pickled, without the environment that making them
        # set (an MLflow file store refuses to open without MLFLOW_ALLOW_FILE_STORE): made again for that alone
        tune_callbacks(space.base.tracking, str(out_dir.parent))
        tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(space, inputs), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        resumed = True
    else:
        check_fits(space)
        inputs = prepare_inputs(space, out_dir, args)
        (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=2))
        record_path.write_text(json.dumps(record, indent=2))
        tuner = build_tuner(space, out_dir, inputs, verbose=verbose)
        resumed = False
    t0 = time.perf_counter()
    grid = tuner.fit()
    summary = write_results(grid, space, out_dir)
    summary.update(resumed=resumed, sweep_s=time.perf_counter() - t0, out_dir=str(out_dir))
    if not space.sweep.keep_models:
        for model_dir in Path(inputs["trials_dir"]).glob("*/model"):
            shutil.rmtree(model_dir, ignore_errors=True)
    return summary
