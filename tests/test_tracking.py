"""Tracking: metrics.jsonl per stage always; MLflow (local file store), TensorBoard event files when configured;
and `stemqa runs` over a run directory built from real computations (tiny-qwen3 SFT steps, real DPO losses)."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from stemqa.runs import Run
from stemqa.tracking import TrackingConfig, log_stage, read_rows, stage_rows
from stemqa.train.history import TrainHistory

SAMPLE = Path(__file__).resolve().parents[1] / "stemqa" / "sample_data"


def sample_records(n: int = 16):
    from stemqa.data.mcq import load_file

    records, _ = load_file(SAMPLE / "mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl", "arc_jsonl",
                           subject="science", limit=n)
    return records


def real_sft_losses(model_path: str, grad_accum: int, steps: int = 4, micro_batch: int = 2) -> list[float]:
    """Train loss per optimizer step of real SFT steps (stemqa's encode/collate/loss) on tiny-qwen3."""
    import torch

    from stemqa.models import load_causal_lm, load_tokenizer
    from stemqa.train.sft import collate, completion_loss, encode_mcq

    torch.manual_seed(0)
    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype="float32")
    model.train()
    samples = [encode_mcq(tok, q, 256) for q in sample_records()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, k = [], 0
    for _ in range(steps):
        total = 0.0
        for _ in range(grad_accum):
            batch = [samples[(k + i) % len(samples)] for i in range(micro_batch)]
            k += micro_batch
            loss, _ = completion_loss(model, collate(batch, tok.pad_token_id))
            (loss / grad_accum).backward()
            total += float(loss.detach()) / grad_accum
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def real_dpo_evals(steps=(0, 2, 4), pairs: int = 32) -> list[dict]:
    """Validation {step, reward_accuracy, reward_margin, loss} from stemqa's DPO loss on log-probs drifting
    toward the chosen answers as training proceeds (seeded)."""
    import torch

    from stemqa.train.losses import dpo_loss

    g = torch.Generator().manual_seed(0)
    ref_c, ref_r = -torch.rand(pairs, generator=g) * 20, -torch.rand(pairs, generator=g) * 20
    out = []
    for step in steps:
        noise = torch.randn(pairs, 2, generator=g)
        res = dpo_loss("sigmoid", ref_c + 0.5 * step + noise[:, 0], ref_r - 0.3 * step + noise[:, 1], ref_c, ref_r, 0.1)
        out.append({"step": step, "reward_accuracy": float(res["correct"].mean()),
                    "reward_margin": float(res["margin"].mean()), "loss": float(res["losses"].mean())})
    return out


def read_tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (TFRecord framing: len u64, crc u32, data, crc u32)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_stage_rows_from_sft_and_dpo_metrics():
    history = TrainHistory.of([2.0, 1.5, 1.0], [{"step": 0, "reward_accuracy": 0.5, "reward_margin": 0.0},
                                                {"step": 2, "reward_accuracy": 0.75, "reward_margin": 0.2}])
    rows = stage_rows({"train_loss_last": 1.0, "stopped_early": False, "sample_ids": [[1]], "note": "x",
                       "pairs": {"train": 8}}, history)
    assert rows[0] == {"step": 0, "val/reward_accuracy": 0.5, "val/reward_margin": 0.0}
    assert rows[2] == {"step": 2, "train/loss": 1.5, "val/reward_accuracy": 0.75, "val/reward_margin": 0.2}
    assert rows[-1] == {"step": None, "train_loss_last": 1.0, "stopped_early": 0.0, "pairs.train": 8.0}


def test_no_tracker_keeps_metrics_in_run_dir(tmp_path, tiny_model):
    run = Run.create(str(tmp_path), "t")
    losses = real_sft_losses(tiny_model, grad_accum=1, steps=3)
    with run.stage("sft") as rec:
        rec.add_metrics(train_loss_last=losses[-1])
    path = log_stage(run, "sft", run.manifest()["stages"]["sft"]["metrics"], TrackingConfig(backends=[]),
                     history=TrainHistory.of(losses))
    rows = read_rows(run.path, "sft")
    assert path == run.path / "sft" / "metrics.jsonl"
    assert [r["train/loss"] for r in rows if r["step"]] == pytest.approx(losses)
    assert not (tmp_path / "mlruns").exists() and not (run.path / "tensorboard").exists()


def test_mlflow_file_store_and_tensorboard(tmp_path):
    from mlflow.tracking import MlflowClient

    run = Run.create(str(tmp_path), "t", run_id="r1")
    evals = real_dpo_evals()
    losses = [0.69, 0.6, 0.5, 0.4]
    metrics = {"val_reward_accuracy_best": evals[-1]["reward_accuracy"]}
    cfg = TrackingConfig(experiment="stemqa-test")
    many = {f"p{i}": i for i in range(150)}  # more params than one MLflow batch takes
    log_stage(run, "sft", {}, cfg, config={"lr": 1e-4, "resources": {"grad_accum": 2}, **many},
              history=TrainHistory.of([2.0, 1.0]))
    log_stage(run, "dpo", metrics, cfg, config={"beta": 0.1}, history=TrainHistory.of(losses, evals))

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("stemqa-test")
    runs = {r.data.tags["stemqa_stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"-", "sft", "dpo"}  # one parent per stemqa run, one child per stage
    parent = runs["-"].info.run_id
    assert runs["dpo"].data.tags["mlflow.parentRunId"] == parent == runs["sft"].data.tags["mlflow.parentRunId"]
    hist = client.get_metric_history(runs["dpo"].info.run_id, "val/reward_accuracy")
    assert sorted((m.step, m.value) for m in hist) == [(e["step"], e["reward_accuracy"]) for e in evals]
    assert [m.value for m in sorted(client.get_metric_history(runs["dpo"].info.run_id, "train/loss"),
                                    key=lambda m: m.step)] == pytest.approx(losses)
    assert runs["sft"].data.params["resources.grad_accum"] == "2" and len(runs["sft"].data.params) == 152

    tb = read_tb_scalars(run.path / "tensorboard" / "dpo")
    assert [v for _, v in sorted(tb["train/loss"])] == pytest.approx(losses)
    assert [s for s, _ in sorted(tb["val/reward_margin"])] == [0, 2, 4]


def test_wandb_offline_run_holds_the_stage_metrics(tmp_path, monkeypatch):
    """W&B in offline mode (no account, no network): the run file carries every step's metrics and the summary."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = Run.create(str(tmp_path), "t")
    history = TrainHistory.of([1.5, 1.25, 0.75], [{"step": 2, "reward_accuracy": 0.625}])
    log_stage(run, "dpo", {"final_acc": 0.875}, TrackingConfig(backends=["wandb"], wandb_mode="offline"),
              history=history)
    # `finish()` only *tells* wandb-core the run is done (a fire-and-forget publish); the core flushes the
    # run file when it closes the stream, which under load can be after finish() returns. Teardown waits for
    # the core to exit, as the atexit hook does when a job's process ends, so the file is whole after it.
    import wandb

    wandb.teardown()
    files = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    keys = (b"train/loss", b"val/reward_accuracy", b"final_acc", b"0.625", b"0.875", b"1.25", b"0.75")
    deadline = time.monotonic() + 30  # belt and braces: should the core still be writing, give it time
    while True:
        data = files[0].read_bytes()  # protobuf records: keys and JSON values are stored as plain strings
        if all(k in data for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key
    assert (run.path / "dpo" / "metrics.jsonl").exists()


def test_tracking_config_rejects_unknown():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrackingConfig(backends=["neptune"])
    with pytest.raises(ValidationError):
        TrackingConfig(mlflow_url="x")


def test_runs_list_and_show(tmp_path, capsys):
    from stemqa.cli.runs import lineage, main

    run = Run.create(str(tmp_path), "demo", run_id="demo-1")
    with run.stage("data", inputs={"data_root": "/data"}) as rec:
        (rec.dir / "train.jsonl").write_text("{}\n")
        rec.add_artifact("train", rec.dir / "train.jsonl")
    with run.stage("sft", inputs={"train": "data/train.jsonl", "base_model": "tiny"}, config={"lr": 1e-3}) as rec:
        (rec.dir / "model").mkdir()
        rec.add_artifact("model", rec.dir / "model")
        rec.add_metrics(train_loss_last=1.234)
    with pytest.raises(RuntimeError):
        with run.stage("dpo", inputs={"base_model": "sft/model"}):
            raise RuntimeError("boom")
    assert main(["--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo-1" in out and "sft loss 1.234" in out and "dpo (failed)" in out
    assert main(["show", "demo-1", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "data.train -> sft (train)" in out and "sft.model -> dpo (base_model)" in out
    assert "RuntimeError: boom" in out and "artifact model: sft/model" in out
    assert ("sft", "base_model", "external: tiny") in lineage(run.manifest())
    with pytest.raises(FileNotFoundError, match="nope"):
        main(["show", "nope", "--storage", str(tmp_path)])


def test_tune_sweep_logs_each_trial_to_mlflow(tmp_path, ray_local):
    """Sweeps go through Ray Tune's own MLflowLoggerCallback: one MLflow run per trial, every report a step."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from stemqa.tracking import tune_callbacks

    def trainable(config):
        for step in range(3):
            tune.report({"loss": config["lr"] * (3 - step)})

    tuner = tune.Tuner(trainable, param_space={"lr": tune.grid_search([0.1, 0.2])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="sweep",
                                                 callbacks=tune_callbacks(TrackingConfig(experiment="sweep-test"),
                                                                          str(tmp_path))))
    assert not tuner.fit().errors
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("sweep-test")
    trials = client.search_runs([exp.experiment_id])
    assert len(trials) == 2
    for t in trials:
        lr = float(t.data.params["lr"])
        hist = sorted(client.get_metric_history(t.info.run_id, "loss"), key=lambda m: m.step)
        assert [m.value for m in hist] == pytest.approx([lr * 3, lr * 2, lr * 1])


def test_step_logger_logs_live_and_the_driver_adds_only_the_summary(tmp_path, monkeypatch):
    """What a Train worker's rank 0 does (StepLogger through Ray's setup_mlflow / setup_wandb, TensorBoard), then
    the driver's log_stage: each step once in every tracker, with the summary beside it; other ranks log nothing."""
    from mlflow.tracking import MlflowClient

    from stemqa.tracking import StepLogger, open_stage

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = Run.create(str(tmp_path), "t", run_id="r1")
    cfg = TrackingConfig(experiment="live", backends=["mlflow", "tensorboard", "wandb"])
    live = open_stage(run, "dpo", cfg, {"beta": 0.1})
    assert client_status(live) == "RUNNING"  # the stage's run exists while it runs
    evals = real_dpo_evals()
    losses = [0.69, 0.61, 0.52, 0.47]
    assert StepLogger.open(live.model_dump(), rank=1)._mlflow is None  # other ranks: a no-op logger
    logger = StepLogger.open(live.model_dump(), rank=0)
    for step in range(0, 5):
        vals = {"train/loss": losses[step - 1]} if step else {}
        vals.update({f"val/{k}": v for e in evals if e["step"] == step for k, v in e.items() if k != "step"})
        logger.log(step, vals)
    logger.close()
    log_stage(run, "dpo", {"val_reward_accuracy_best": 0.875}, cfg, {"beta": 0.1}, live,
              history=TrainHistory.of(losses, evals))

    client = MlflowClient(tracking_uri=live.mlflow_uri)
    got = client.get_run(live.mlflow_run_id)
    hist = client.get_metric_history(live.mlflow_run_id, "train/loss")
    assert sorted((h.step, h.value) for h in hist) == list(zip([1, 2, 3, 4], losses))  # once each
    assert [h.step for h in client.get_metric_history(live.mlflow_run_id, "val/reward_accuracy")] == [0, 2, 4]
    assert got.data.metrics["val_reward_accuracy_best"] == 0.875
    assert got.data.params["beta"] == "0.1" and got.info.status == "FINISHED"
    tb = read_tb_scalars(run.path / "tensorboard" / "dpo")
    assert sorted(tb["train/loss"]) == [(s, pytest.approx(v)) for s, v in zip([1, 2, 3, 4], losses)]
    assert [v for _, v in tb["final/val_reward_accuracy_best"]] == [0.875]
    files = list((run.path / "wandb").glob(f"offline-run-*-{live.wandb_id}/run-{live.wandb_id}.wandb"))
    assert files and any(b"train/loss" in f.read_bytes() and b"0.47" in f.read_bytes() for f in files), files
    assert [json.loads(line)["step"] for line in (run.path / "dpo/metrics.jsonl").read_text().splitlines()] == \
        [0, 1, 2, 3, 4, None]  # the run directory keeps everything whatever the trackers


def client_status(live) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=live.mlflow_uri).get_run(live.mlflow_run_id).info.status


def test_a_crashed_stage_is_marked_failed(tmp_path):
    from stemqa.tracking import mark_failed, open_stage

    run = Run.create(str(tmp_path), "t")
    live = open_stage(run, "sft", TrackingConfig(backends=["mlflow"]))
    mark_failed(live)
    assert client_status(live) == "FAILED"
    from mlflow.tracking import MlflowClient

    from stemqa.tracking import end_run

    end_run(run, TrackingConfig(backends=["mlflow"]), "FAILED")
    client = MlflowClient(tracking_uri=live.mlflow_uri)
    parent = client.get_run(client.get_run(live.mlflow_run_id).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED" and parent.data.tags["stemqa_stage"] == "-"
