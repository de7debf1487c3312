"""Ray Tune sweeps: search spaces checked at load time, and a real sweep on tiny-qwen3 (ASHA stopping trials,
an injected crash recorded as failed, the driver killed mid-sweep and the sweep restored without re-running
finished trials), its table, best config and plots."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from stemqa.config import ConfigError, load_config
from stemqa.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]


def tiny_space_with(tmp_path: Path, paired: list[str], fixed: Optional[dict] = None, scheduler: Optional[str] = None,
                    resources: Optional[str] = None) -> str:
    """stemqa/tune/spaces/tiny.yaml with only the given `paired` trials (fewer trials, where a test needs the sweep
    machinery, not ASHA's choices), plus `fixed` values, and `scheduler` / `resources` replaced when given."""
    text = (ROOT / "stemqa" / "tune" / "spaces" / "tiny.yaml").read_text()
    head, rest = text.split("\npaired:", 1)
    head += "".join(f"\n  {k}: {v}" for k, v in (fixed or {}).items())
    tail = rest[rest.index("\nmetric:"):]
    if scheduler:
        tail = re.sub(r"(?m)^scheduler: .*$", f"scheduler: {scheduler}", tail)
    if resources:
        tail = re.sub(r"(?m)^resources: .*$", f"resources: {resources}", tail)
    path = tmp_path / "tiny_small.yaml"
    path.write_text(head + "\npaired:\n" + "".join(f"  - {t}\n" for t in paired) + tail.lstrip("\n"))
    return str(path)


def test_repo_spaces_load_with_the_issue_ranges():
    sft = load_space("sft")
    assert sft.sweep.params["sft.lr"].loguniform == (1e-8, 1e-4)
    assert sft.sweep.params["sft.grad_accum"].choice == [1, 2, 4, 8]
    assert [e["sft.lora"] is None for e in sft.sweep.paired] == [True, False]  # LoRA vs full
    assert sft.base.sft.max_steps is None  # fixed: epochs decide the length
    dpo = load_space("dpo")
    assert dpo.sweep.params["dpo.beta"].grid == [0.07, 0.10, 0.13]
    assert [e["dpo.loss"] for e in dpo.sweep.paired] == ["sigmoid", "robust", "ipo"]
    quant = load_space("quant")
    assert quant.sweep.params["quant.calibration_samples"].grid == [20, 200, 2000]
    assert {e["quant.method"] for e in quant.sweep.paired} == {"gptq", "smoothquant-gptq"}
    tiny = load_space("tiny", overrides=["sft.seed=3"])  # --set applies to the base config
    assert tiny.base.sft.seed == 3 and tiny.base.model.name == "tiny-qwen3"
    # trial_mode auto: in process where every trial trains one CPU worker (tiny), else a Ray Train run per trial
    assert (tiny.trial_mode, sft.trial_mode, dpo.trial_mode, quant.trial_mode) == ("local", "train", "train", "train")


def test_trial_mode_auto_falls_back_to_train_and_train_is_kept(tmp_path):
    two = tiny_space_with(tmp_path, ["{sft.lr: 1.0e-3}", "{sft.lr: 1.0e-3, sft.resources: {num_workers: 2, "
                                     "cpus_per_worker: 0.45, zero_stage: 0, max_failures: 0}}"])
    assert load_space(two).trial_mode == "train"  # one trial trains 2 workers: every trial runs as a Train run
    train = tiny_space_with(tmp_path, ["{sft.lr: 1.0e-3}"], resources="{trial_mode: train}")
    assert load_space(train).trial_mode == "train"


@pytest.mark.parametrize("body, expected", [
    ("stage: sft\nparams: {sft.lrr: {grid: [1]}}", "params.sft.lrr: unknown config field 'lrr' under sft"),
    ("stage: sft\nparams: {sft.grad_accum: {choice: [1, 2, 0]}}",
     "params.sft.grad_accum.choice[2] = 0 is not a valid sft.grad_accum"),
    ("stage: sft\nparams: {sft.grad_accum: {uniform: [1, 4]}}", "valid integer"),  # float range on an int field
    ("stage: dpo\nparams: {dpo.loss: [sigmoid, hinge]}", "params.dpo.loss.grid[1] = 'hinge'"),
    ("stage: sft\npaired: [{sft.lora: {r: 0}}]", "paired[0].sft.lora = {'r': 0}"),
    ("stage: sft\nfixed: {sft.lr: -1}", "fixed: sft.lr"),
    ("stage: sft\nparams: {sft.lr: {loguniform: [0, 1]}}", "sft.lr: loguniform: low must be > 0"),
    ("stage: sft\nmetric: accuracy", "metric 'accuracy' is not reported"),
    ("stage: sft\nschedulr: {type: asha}", "schedulr: unknown key"),
    ("stage: quant\nparams: {trial.fail_at_step: [null, 2]}", "needs a training stage"),
    ("stage: sft\nparams: {trial.crash: [1]}", "unknown trial switch"),
    # in-process trials train one rank on CPU: 2 workers (demo's default), a GPU, or a stage without it, rejected
    ("stage: sft\nscheduler: {type: fifo}\nresources: {trial_mode: local}",
     "resources.trial_mode: local trains each trial in its own Tune trial process, one rank on CPU, but the base "
     "config with `fixed`: sft.resources.num_workers=2"),
    ("stage: sft\nfixed: {sft.resources.num_workers: 1}\nparams: {sft.resources.use_gpu: [false, true]}\n"
     "scheduler: {type: fifo}\nresources: {trial_mode: local}",
     "params.sft.resources.use_gpu.grid[1] = True: sft.resources.use_gpu=true"),
    ("stage: sft\nfixed: {sft.resources.num_workers: 1}\npaired: [{sft.resources.num_workers: 4}]\n"
     "scheduler: {type: fifo}\nresources: {trial_mode: local}", "paired[0].sft.resources.num_workers = 4"),
    ("stage: dpo\nfixed: {dpo.resources.num_workers: 1}\nresources: {trial_mode: local}", "Ray Data actor"),
    ("stage: quant\nresources: {trial_mode: local}", "quant trials run no training loop"),
    ("stage: sft\nresources: {trial_mode: inline}", "resources.trial_mode: Input should be 'auto', 'train' or 'local'"),
])
def test_bad_space_fails_at_load_naming_the_yaml_path(tmp_path, body, expected):
    path = tmp_path / "space.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_space(str(path))
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def _experiment_state(exp_dir: Path) -> dict[str, str]:
    """{trial_id: status} as Tune last saved it (what Tuner.restore starts from)."""
    state = json.loads(max(exp_dir.glob("experiment_state-*.json"), key=os.path.getmtime).read_text())
    trials = [json.loads(t) if isinstance(t, str) else t for t, _ in state["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def _events(out: Path, kind: str) -> list[str]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [e["trial_id"] for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def _rows(summary: dict) -> dict[str, list[dict]]:
    import csv

    rows = list(csv.DictReader(open(summary["results_csv"])))
    return {s: [r for r in rows if r["status"] == s] for s in ("completed", "stopped", "failed")}


def test_sweep_asha_stops_trials_and_a_crash_is_recorded(ray_local, tmp_path):
    """stemqa/tune/spaces/tiny.yaml: 6 SFT trials, each the SFT stage's run reporting its eval loss every step;
    one CPU worker each, so (trial_mode auto) each trains in its own Tune trial process, reused from trial to
    trial. Every validation reaches Tune, ASHA stops the poor learning rates early, the injected crash is one
    failed trial with its error, the others finish; the table, best config and plots are written and usable, and
    every trial is an MLflow run (the tracking config's backends, through Tune's logger callbacks)."""
    from stemqa.tune.sweep import run_sweep

    space = load_space("tiny")
    assert space.trial_mode == "local"
    summary = run_sweep(space, tmp_path / "sweep")
    assert summary["resumed"] is False
    by_status = _rows(summary)
    assert sum(map(len, by_status.values())) == 6
    assert summary["counts"] == {k: len(v) for k, v in by_status.items()}
    failed, = by_status["failed"]
    assert failed["trial.fail_at_step"] == "2" and "died" in failed["error"], failed
    assert len(by_status["stopped"]) >= 2, by_status  # ASHA: stopped before their last step
    assert all(int(r["steps"]) < 6 for r in by_status["stopped"])
    assert by_status["completed"] and all(int(r["steps"]) == 6 for r in by_status["completed"])
    # Tune got a report at each validation after steps 1-5, the final checkpoint's (step 6) and the trial's summary
    assert all(int(r["reports"]) == 7 for r in by_status["completed"]), by_status["completed"]
    for r in by_status["completed"] + by_status["stopped"]:  # each report carried the step and the eval loss
        progress = [json.loads(x) for x in (tmp_path / "sweep/tune" / r["trial_id"] / "result.json").open()]
        steps = [x["step"] for x in progress if "eval_loss" in x]
        assert steps[:int(r["steps"])] == list(range(1, int(r["steps"]) + 1)), (r["trial_id"], steps)
    pids = [json.loads(line)["pid"] for d in (tmp_path / "sweep/trials").iterdir()
            for line in (d / "starts.jsonl").read_text().splitlines()]
    assert len(pids) == 6 and len(set(pids)) < 6, pids  # trial actors were reused (imports paid once per actor)
    # the stopped trials are the poor ones: each worse than the best completed trial when it was stopped
    best = summary["best"]
    assert float(best["eval_loss"]) == min(float(r["eval_loss"]) for r in by_status["completed"])
    assert all(float(r["eval_loss"]) > float(best["eval_loss"]) for r in by_status["stopped"])
    assert float(best["sft.lr"]) >= 1e-3

    cfg = load_config(summary["best_yaml"])  # what `stemqa sft --config best.yaml` does with it
    assert cfg.sft.lr == pytest.approx(float(best["sft.lr"])) and cfg.model.name == "tiny-qwen3"
    assert cfg.sft.max_steps == 6  # the space's fixed values are part of the exported config
    for plot in summary["plots"]:
        data = Path(plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, plot
    assert {Path(p).name for p in summary["plots"]} == {"eval_loss_vs_sft.lr.png", "eval_loss_by_step.png"}
    assert not list((tmp_path / "sweep/trials").glob("*/model"))  # keep_models: false
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())  # beside the sweep directory
    trials = client.search_runs([client.get_experiment_by_name("stemqa").experiment_id])
    assert len(trials) == 6 and sum("eval_loss" in t.data.metrics for t in trials) >= 5  # the crash may beat it


def _newest_checkpoint_step(trial_dir: Path) -> int:
    """Step of the newest complete checkpoint (every rank's upload marker written) of a trial's SFT run; -1: none."""
    from stemqa.train.checkpoint import CKPT_PREFIX, UPLOADED, step_of

    done = [step_of(d.name) for d in (trial_dir / "ray" / "sft").glob(f"{CKPT_PREFIX}*")
            if (d / UPLOADED.format(0)).exists()]
    return max(done, default=-1)


@pytest.mark.slow  # a 4-trial sweep plus a restart: 1-3 min on 2 CPUs
def test_sweep_restored_after_driver_kill_does_not_rerun_finished_trials(ray_local, tmp_path):
    """`stemqa sweep` runs in a subprocess against this test's Ray instance and is killed (SIGKILL) once two
    trials have finished and a running one has a checkpoint; the same command's code then restores the sweep from
    its directory. Trials Tune had saved as finished ran exactly once, the unfinished one resumed from its
    checkpoint (not step 0), and the results cover every trial. The trials train in their Tune trial processes
    (trial_mode auto -> local), so the checkpoint is one `stemqa.train.session` wrote, not Ray Train."""
    from stemqa.tune.sweep import run_sweep

    long_steps = 200  # the trial running when the driver is killed (~10 s of steps): a window to kill it in
    space = tiny_space_with(tmp_path, ["{sft.lr: 3.0e-3}", "{sft.lr: 1.0e-3, trial.fail_at_step: 2}",
                                       "{sft.lr: 1.0e-8}", f"{{sft.lr: 1.0e-3, sft.max_steps: {long_steps}}}"],
                            fixed={"sft.checkpoint_every": 2}, scheduler="{type: fifo}")
    assert load_space(space).trial_mode == "local"
    out = tmp_path / "sweep"
    env = dict(os.environ, STEMQA_CLUSTER_DIR=str(tmp_path / "no-cluster"), PYTHONUNBUFFERED="1")
    address = ray_local.get_runtime_context().gcs_address

    def running_with_checkpoint() -> dict[str, int]:
        ended = set(_events(out, "complete")) | set(_events(out, "error"))
        steps = {t: _newest_checkpoint_step(out / "trials" / t) for t in _events(out, "start") if t not in ended}
        return {t: s for t, s in steps.items() if s > 0}

    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.sweep", space, "--out", str(out),
                                   "--address", address], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 400
            while len(_events(out, "complete")) < 2 and time.time() < deadline and driver.poll() is None:
                time.sleep(0.5)
            assert len(_events(out, "complete")) >= 2, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(1.5)  # experiment state is saved every second (TUNE_GLOBAL_CHECKPOINT_S=1)
            while not running_with_checkpoint() and time.time() < deadline and driver.poll() is None:
                time.sleep(0.1)
            at_kill = running_with_checkpoint()  # killed right away: the trial is mid-run
            assert at_kill, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    saved = _experiment_state(out / "tune")
    finished = {t for t, s in saved.items() if s in ("TERMINATED", "ERROR")}
    assert len(finished) >= 2 and len(finished) < 4, saved  # the kill came before the sweep's end
    assert not (out / "results.csv").exists()  # the killed driver never got to write results

    summary = run_sweep(load_space(space), out)  # the same directory: Tuner.restore
    assert summary["resumed"] is True
    for trial_id in finished:  # run exactly once: before the kill
        assert len((out / "trials" / trial_id / "starts.jsonl").read_text().splitlines()) == 1, trial_id
    by_status = _rows(summary)
    assert sum(map(len, by_status.values())) == 4 and len(by_status["failed"]) == 1
    assert len(by_status["completed"]) == 3 and summary["best_yaml"]
    for trial_id, step in at_kill.items():  # started again, from the checkpoint it had (or a later one)
        assert len((out / "trials" / trial_id / "starts.jsonl").read_text().splitlines()) == 2, trial_id
        last = [json.loads(x) for x in (out / "tune" / trial_id / "result.json").open()][-1]
        assert last["trial_done"] and last["steps"] == long_steps, last
        assert last["resumed_from_step"] is not None and last["resumed_from_step"] >= step, (step, last)


def test_best_config_is_accepted_by_the_stage_jobs(tmp_path):
    """best.yaml is a full config: the stage CLIs load it unchanged (config errors would exit 2 before Ray)."""
    from stemqa.tune.results import best_config_yaml

    space = load_space("dpo")
    text = best_config_yaml(space, {"dpo.beta": 0.13, "dpo.loss": "robust", "dpo.label_smoothing": 0.1,
                                    "dpo.lr": 3e-6, "dpo.grad_accum": 2})
    (tmp_path / "best.yaml").write_text(text)
    cfg = load_config(str(tmp_path / "best.yaml"))
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.grad_accum, cfg.dpo.max_steps) == (0.13, "robust", 2, 12)
    out = subprocess.run([sys.executable, "-m", "stemqa.cli", "config", "--config", str(tmp_path / "best.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["dpo"]["beta"] == 0.13


DPO_SPACE = """stage: dpo
base: tests/configs/tiny.yaml
fixed:
  dpo.max_steps: 4
  dpo.eval_every: 2
  dpo.patience: 5
  dpo.checkpoint_every: 1000
  dpo.resources: {num_workers: 1, cpus_per_worker: 0.9, zero_stage: 0, max_failures: 0}
paired:
  - {dpo.loss: sigmoid, dpo.beta: 0.07}
  - {dpo.loss: ipo, dpo.beta: 0.13}
scheduler: {type: asha, grace_period: 2}
resources: {trial_mode: train}  # the Train path of sweeps: a TorchTrainer per trial, TuneReportCallback
"""


@pytest.mark.slow  # 2 DPO trials plus the reference log-probs: 2-3 min on 2 CPUs
def test_dpo_sweep_reports_val_reward_accuracy_per_eval(ray_local, tmp_path):
    """Also the sweep's Ray Train path (trial_mode: train): each trial a TorchTrainer whose reports reach Tune
    through TuneReportCallback."""
    from stemqa.tune.sweep import run_sweep

    (tmp_path / "dpo.yaml").write_text(DPO_SPACE)
    space = load_space(str(tmp_path / "dpo.yaml"))
    assert space.trial_mode == "train"
    summary = run_sweep(space, tmp_path / "sweep")
    by_status = _rows(summary)
    assert sum(map(len, by_status.values())) == 2 and not by_status["failed"], by_status
    assert "val_reward_accuracy_by_step.png" in {Path(p).name for p in summary["plots"]}
    for r in by_status["completed"]:
        assert 0.0 <= float(r["val_reward_accuracy_best"]) <= 1.0 and int(r["steps"]) == 4
    cfg = load_config(summary["best_yaml"])
    assert (cfg.dpo.loss, cfg.dpo.beta) in (("sigmoid", 0.07), ("ipo", 0.13))


@pytest.mark.slow  # on the two-node local cluster, a 2-trial sweep as a Ray job: 2-3 min
def test_sweep_as_a_ray_job_on_the_local_cluster(local_cluster, tmp_path):
    env = dict(local_cluster["env"])
    space = tiny_space_with(tmp_path, ["{sft.lr: 3.0e-3}", "{sft.lr: 1.0e-3}"])
    out = subprocess.run(
        [sys.executable, "-m", "stemqa.cli", "submit", "sweep", space, "--address", local_cluster["dashboard"],
         "--set", f"cluster.storage_path={tmp_path}", "--timeout", "900"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1000)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweeps = list(tmp_path.glob("sweep-sft-*"))
    assert len(sweeps) == 1 and (sweeps[0] / "results.csv").exists() and (sweeps[0] / "best.yaml").exists()
    assert len((sweeps[0] / "results.csv").read_text().splitlines()) == 3  # header + 2 trials
