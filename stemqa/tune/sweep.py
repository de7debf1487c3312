"""`run_sweep`: a Ray Tune sweep whose trials are stemqa stage runs, with ASHA, failures kept, and resume.

Layout of a sweep directory (`out_dir`):

    space.json         the loaded space and base config (a restore must be of the same space)
    inputs/            what every trial reads: train records (sft), pairs + reference log-probs (dpo),
                       calibration and eval records (quant); made once by the driver
    tune/              Ray Tune's experiment (Tuner.restore resumes from here)
    trials/<id>/       each trial's Ray Train run (checkpoints) and, with keep_models, its model
    events.jsonl       driver-side trial events (start, complete, error) with times
    results.csv, best.yaml, plots/   written by `stemqa.tune.results` when the sweep ends

Each SFT/DPO trial is a Ray Train run (`run_sft` / `run_dpo`: TorchTrainer + DeepSpeed) started inside a Tune
*function* trainable, with `TuneReportCallback` forwarding rank 0's reports to Tune (Train V2 cannot be given to
the Tuner directly). The train loop reports the target metric every `report_every` steps (DPO: at each eval),
which is what ASHA compares. A trial that raises is recorded as ERROR with its error and the others go on.
A restarted unfinished trial keeps its id, hence its directory, so its Ray Train run resumes from its last
checkpoint rather than from step 0.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from stemqa.config import ConfigError
from stemqa.tune.space import Space, flat_params, split_trial

# Ray Tune saves its experiment state at most every 10 s by default ("auto"); a driver killed inside that window
# would re-run trials that had finished. Saving every second costs little with tens of trials.
TUNE_ENV = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
EXPERIMENT = "tune"


# ---------------------------------------------------------------- inputs, made once by the driver
def prepare_inputs(space: Space, out_dir: Path, train: Optional[str] = None, pairs: Optional[str] = None,
                   model: Optional[str] = None, calib: Optional[str] = None) -> dict:
    """Files every trial reads -> {"train"|"pairs"|"calib", "eval", "model", "trials_dir"} (absolute paths).

    Defaults come from the base config: data.train (sft, quant calibration), data.preference (dpo pairs),
    eval.sets (quant, `eval_limit` questions per set), model.name (the model dpo and quant start from).
    """
    from stemqa.data.mcq import load_sources, read_records, write_records
    from stemqa.data.paths import data_root

    cfg, stage = space.base, space.sweep.stage
    inp = Path(out_dir) / "inputs"
    inp.mkdir(parents=True, exist_ok=True)
    out = {"trials_dir": str((Path(out_dir) / "trials").resolve()), "model": model or cfg.model.name}
    root = data_root(cfg.data.root)
    if stage in ("sft", "quant"):
        given = train if stage == "sft" else calib
        if given:
            if not Path(given).is_file():
                raise FileNotFoundError(f"{given}: no such MCQ records file")
            read_records(given)  # fail here, naming the row, rather than in every trial
            path = Path(given).resolve()
        else:
            records, _ = load_sources(cfg.data.train, root, cfg.data.skip_invalid)
            if not records:
                raise ConfigError("data.train gives no records to train/calibrate on")
            path = inp / ("train.jsonl" if stage == "sft" else "calib.jsonl")
            write_records(records, path)
        out["train" if stage == "sft" else "calib"] = str(path.resolve())
    if stage == "quant":
        out["eval"] = {}
        for s in cfg.eval.sets:
            records, _ = load_sources(s.sources, root, cfg.data.skip_invalid)
            path = inp / f"eval_{s.name}.jsonl"
            write_records(records[:space.sweep.eval_limit], path)
            out["eval"][s.name] = str(path.resolve())
        if not out["eval"]:
            raise ConfigError("eval.sets is empty: a quant sweep scores each quantized model on them")
    if stage == "dpo":
        out["pairs"] = str(_dpo_pairs(cfg, Path(pairs) if pairs else None, inp / "pairs", out["model"]).resolve())
    return out


def _dpo_pairs(cfg, given: Optional[Path], default_dir: Path, model: str) -> Path:
    """The pairs directory, and its reference log-probs computed now, once, instead of in the first trials."""
    from stemqa.data.preference import SPLITS, prepare_pairs, read_pairs
    from stemqa.models.loader import load_tokenizer, resolve_model
    from stemqa.train.dpo import reference_logps

    pairs_dir = given
    if pairs_dir is None:
        pairs_dir = default_dir
        if not (pairs_dir / "train.jsonl").exists():
            from stemqa.data.paths import data_root

            prepare_pairs(cfg.data.preference, data_root(cfg.data.root), load_tokenizer(model), cfg.dpo, pairs_dir)
    pairs = {s: read_pairs(pairs_dir / f"{s}.jsonl") for s in SPLITS}
    ref = resolve_model(cfg.dpo.reference or model, cfg.model.revision)
    reference_logps(pairs_dir, str(ref), pairs, cfg.dpo)
    return pairs_dir


# ---------------------------------------------------------------- the trial
def run_trial(params: dict, space: Space, inputs: dict) -> None:
    """Tune function trainable: one stage run with this trial's config; reports go to Tune as it trains."""
    import ray.tune

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(inputs["trials_dir"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "starts.jsonl", "a") as f:  # one line per (re)start: shows what a restore re-ran
        f.write(json.dumps({"t": t0, "pid": os.getpid()}) + "\n")
    _, switches = split_trial(flat_params(params))
    cfg = space.trial_config(params)
    stage = space.sweep.stage
    if stage == "quant":
        summary = _quant_trial(cfg, inputs, trial_dir)
    else:
        summary = _train_trial(cfg, space, inputs, trial_dir, switches.get("fail_at_step"))
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


def _train_trial(cfg, space: Space, inputs: dict, trial_dir: Path, fail_at_step: Optional[int]) -> dict:
    from ray.tune.integration.ray_train import TuneReportCallback

    _let_train_clean_up_stopped_runs()

    stage_cfg = getattr(cfg, space.sweep.stage)
    if fail_at_step:
        stage_cfg.resources.max_failures = 0  # the injected worker death must fail the trial, not be recovered
    callbacks = [TuneReportCallback()]
    if space.sweep.stage == "sft":
        from stemqa.train.sft import run_sft

        out = run_sft(cfg, Path(inputs["train"]), trial_dir, run_name="train", fail_at_step=fail_at_step,
                      callbacks=callbacks, report_every=space.sweep.report_every)
    else:
        from stemqa.train.dpo import run_dpo

        # The test split is scored by a Ray Data actor after training; inside a trial it may only use the CPUs
        # the trial's own workers held (they are free by then), or it would wait for CPUs other trials hold.
        res = stage_cfg.resources
        stage_cfg.ref_cpus = min(stage_cfg.ref_cpus, res.num_workers * res.cpus_per_worker)
        out = run_dpo(cfg, Path(inputs["pairs"]), trial_dir, base_model=inputs["model"], run_name="train",
                      fail_at_step=fail_at_step, callbacks=callbacks, report_evals=True)
    m = out["metrics"]
    m.pop("sample_ids", None)
    m.pop("losses", None)  # per-step list: the curve is in the trial's progress.csv
    evals = m.pop("evals", None)
    if evals is not None:  # the per-eval curve, for the DPO plot (also in the trial's progress.csv)
        (trial_dir / "evals.json").write_text(json.dumps(evals))
    return m


def _quant_trial(cfg, inputs: dict, trial_dir: Path) -> dict:
    import torch

    from stemqa.data.mcq import read_records
    from stemqa.eval.run import evaluate
    from stemqa.quant import quantize

    torch.set_num_threads(max(1, int(cfg.quant.num_cpus)))
    q = quantize(cfg.quant, inputs["model"], read_records(inputs["calib"]), trial_dir / "model")
    accs = {}
    for name, path in inputs["eval"].items():
        m = evaluate(q["model_dir"], read_records(path), trial_dir / "eval" / name, scoring=cfg.eval.scoring,
                     batch_size=cfg.eval.batch_size, header=cfg.eval.subject_header, progress=False)
        accs[name] = m["accuracy"]
    summary = {k: v for k, v in q.items() if k not in ("model_dir", "source_model")}
    summary.update({f"accuracy_{k}": v for k, v in accs.items()})
    summary["accuracy"] = sum(accs.values()) / len(accs)
    summary["quant_wall_s"] = summary.pop("wall_s")
    return summary


# ---------------------------------------------------------------- driver
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


def trial_resources(space: Space) -> dict:
    """What the trial itself holds: a sliver for sft/dpo (its Train workers ask for their own CPUs), the
    quantization CPUs for quant (it quantizes and evaluates in the trial process)."""
    if space.sweep.stage == "quant":
        return {"cpu": max(space.sweep.resources.trial_cpus, space.base.quant.num_cpus)}
    return {"cpu": space.sweep.resources.trial_cpus}


def check_fits(space: Space) -> None:
    """A trial whose CPUs exceed the cluster's would wait forever; say so before starting."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = trial_resources(space)["cpu"]
    if space.sweep.stage != "quant":
        res = getattr(space.base, space.sweep.stage).resources
        need += res.num_workers * res.cpus_per_worker
    if need > cpus + 1e-9:
        raise ConfigError(f"{space.path}: one trial needs {need:g} CPUs (trial + Train workers) but the cluster "
                          f"has {cpus:g}; lower {space.sweep.stage}.resources.cpus_per_worker or num_workers")


def _trainable(space: Space, inputs: dict):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, space=space, inputs=inputs), trial_resources(space))


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
        # a fresh trial actor each time: a stopped trial's actor dies with its nested Ray Train run
        reuse_actors=False, trial_dirname_creator=lambda t: t.trial_id,
    )
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=str(Path(out_dir).resolve()), verbose=verbose,
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # a crash is recorded, not retried
        callbacks=[EventLog(Path(out_dir).resolve() / "events.jsonl")],
    )
    return tune.Tuner(_trainable(space, inputs), param_space=space.param_space(), tune_config=tune_config,
                      run_config=run_config)


def _space_record(space: Space) -> dict:
    """What a restore must match: the sweep and the trials' base config (cluster.* says where, not what)."""
    base = space.base.model_dump(mode="json")
    base.pop("cluster", None)
    return {"path": space.path, "sweep": space.sweep.model_dump(mode="json"), "base": base}


def run_sweep(space: Space, out_dir: Path, train: Optional[str] = None, pairs: Optional[str] = None,
              model: Optional[str] = None, calib: Optional[str] = None, verbose: int = 1) -> dict:
    """Run (or resume) the sweep in `out_dir`; Ray must be initialised. Returns the summary of
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
        tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(space, inputs), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        resumed = True
    else:
        check_fits(space)
        inputs = prepare_inputs(space, out_dir, train=train, pairs=pairs, model=model, calib=calib)
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
