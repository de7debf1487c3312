"""The one training loop of SFT and DPO: a Ray Train worker function; the method's loss and evaluation are hooks.

    run_training(method, train, held, ...)     driver: a TorchTrainer over `train_loop`; returns a `TrainResult`
    train_loop(config)                          each Ray Train worker (or, for a sweep trial, the trial's process)

A `Method` (stemqa.train.sft.SFTMethod, stemqa.train.dpo.DPOMethod) says how a micro-batch is scored (`micro`:
its mean loss, its weight and tokens) and how a validation batch adds up (`eval_sums` / `eval_metrics`), what
happens after a validation (DPO keeps the best model and stops early) and what the final model is. The loop
does the rest, the same for both: the deterministic sample order (`common.Schedule`), the optimizer step as the
weighted mean over all its micro-batches and ranks, validation with the same number of forwards on every rank
(ZeRO-3 gathers parameters in each), checkpoints every `checkpoint_every` steps and resuming from them, the
per-step history (`history.jsonl`, written by rank 0: loss, tokens, seconds and every rank's sample ids), the
trackers (rank 0, live), progress lines on the driver, and Tune reports in sweeps.

The loop reaches the run it is part of (rank, reports, checkpoints, storage) through `stemqa.train.session`, never
`ray.train` directly: a Ray Train worker's, or a sweep trial's that trains in its own process (trial_mode local).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from pydantic import BaseModel

from stemqa.config.schema import TrainConfig, TrainResources
from stemqa.train import checkpoint, common, session
from stemqa.train.history import HISTORY_FILE, EvalRow, StepRow, TrainHistory


class TrainHooks(BaseModel):
    """Switches for tests and sweeps, in one object rather than parameters of every function on the way."""

    fail_at_step: Optional[int] = None  # rank 0 exits (os._exit) after this optimizer step, unless resumed
    report_evals: bool = False  # a metrics-only ray.train.report after each validation (what ASHA compares)


@dataclass
class TrainOptions:
    """How a training run is observed and steered, besides its config."""

    hooks: TrainHooks = field(default_factory=TrainHooks)
    callbacks: list = field(default_factory=list)  # Ray Train UserCallbacks (Tune's TuneReportCallback)
    # Train here, in the calling process (a Tune trial's), not on a Ray Train worker group: one rank on CPU,
    # reports to Tune, checkpoints where a Train run of the same name keeps them (stemqa.train.session)
    in_process: bool = False
    tracking: Any = None  # stemqa.tracking.LiveTarget: rank 0 logs each step to the stage's tracker runs
    progress: Any = None  # stemqa.progress.RemoteTask: rank 0 reports step / loss / tokens per second


class Micro(NamedTuple):
    loss: Any  # the micro-batch's mean loss (a tensor with grad)
    weight: float  # its share of the optimizer step: completion tokens (SFT), 1 (DPO)
    tokens: int  # real tokens the forward saw


class Method:
    """What SFT and DPO put into the loop. `cfg` is the stage's TrainConfig; `pad_id` the tokenizer's."""

    report_eval_prefix = ""  # eval metrics as reported (Tune sees eval_loss / val_reward_accuracy)

    def __init__(self, cfg: TrainConfig, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id

    def load_model(self, base_path: str, bf16: bool):
        return common.load_train_model(base_path, self.cfg.lora, bf16, packed=self.cfg.packing,
                                       zero_stage=self.cfg.resources.zero_stage)

    def warmup_steps(self, total: int) -> int:
        return 0

    def weight(self, samples: list[dict]) -> float:
        raise NotImplementedError

    def micro(self, engine, samples: list[dict]) -> Micro:
        raise NotImplementedError

    def eval_sums(self, engine, samples: list[dict]) -> list[float]:
        raise NotImplementedError

    def eval_metrics(self, sums: list[float]) -> dict:
        raise NotImplementedError

    def on_eval(self, state: dict, ev: dict) -> bool:
        """After a validation: update state["method"]; True when the model should be saved now."""
        return False

    def report(self, state: dict) -> dict:
        """What every ray.train.report of the run carries (a sweep's metric must be one of these keys)."""
        last = state["evals"][-1] if state["evals"] else {}
        out = {"step": state["step"], "train_loss": state["history"][-1]["loss"] if state["history"] else None}
        out.update({f"{self.report_eval_prefix}{k}": v for k, v in last.items() if k != "step"})
        return out

    def summary(self, state: dict) -> dict:
        return {}

    def save_final(self, engine, state: dict, base_path: str, model_dir: Path) -> None:
        save_model(engine, self.cfg, base_path, model_dir)


def save_model(engine, cfg: TrainConfig, base_path: str, model_dir: Path) -> None:
    weights = checkpoint.full_state_dict(engine, cfg.resources.zero_stage)  # a collective: every rank calls it
    if common.rank() == 0:
        checkpoint.save_hf_model(weights, base_path, cfg.lora, Path(model_dir))


# ---------------------------------------------------------------- the worker
def _evaluate(engine, method: Method, held: list[dict], r: int, world: int) -> dict:
    import torch

    sums: Optional[list[float]] = None
    engine.eval()
    with torch.no_grad():
        for idx, real in common.eval_batches(len(held), method.cfg.batch_size, r, world):
            part = method.eval_sums(engine, [held[i] for i in idx])
            sums = [a * real + b for a, b in zip(part, sums or [0.0] * len(part))]  # a dummy batch adds 0
    engine.train()
    return method.eval_metrics(common.all_reduce_sum(sums))


def _new_state() -> dict:
    return {"step": 0, "tokens": 0, "train_s": 0.0, "history": [], "evals": [], "stopped_early": False,
            "method": {}}


def train_loop(config: dict) -> None:
    """Ray Train worker: build the engine, resume if a checkpoint exists, train, save the model and history."""
    import ray
    import torch

    from stemqa.tracking import StepLogger

    t_start = time.perf_counter()
    method: Method = config["method"]
    cfg, res = method.cfg, method.cfg.resources
    hooks = TrainHooks.model_validate(config["hooks"])
    common.worker_setup(res)
    train, held = ray.get(config["data_ref"])
    r, world = common.rank(), common.world_size()
    schedule = common.Schedule(len(train), cfg.batch_size, world, cfg.grad_accum, cfg.seed)
    total = schedule.total_steps(cfg.epochs, cfg.max_steps)
    torch.manual_seed(cfg.seed + r)

    model = method.load_model(config["base_path"], common.use_bf16(res))
    engine = common.make_engine(model, res, cfg.lr, cfg.batch_size, cfg.grad_accum, total, method.warmup_steps(total))
    checkpoint.weights_only_engine(engine)
    restored = checkpoint.restore_checkpoint(engine)
    resumed_from = restored["step"] if restored else None  # `state` below is this dict and moves on
    state = restored or _new_state()
    tracker = StepLogger.open(config.get("tracking"), r)  # the stage's tracker runs, live (rank 0)
    progress = config.get("progress") if r == 0 else None

    def validate() -> None:
        ev = {"step": state["step"], **_evaluate(engine, method, held, r, world)}
        state["evals"].append(ev)
        tracker.log(state["step"], {f"val/{k}": v for k, v in ev.items() if k != "step"})
        if method.on_eval(state, ev):
            save_model(engine, cfg, config["base_path"], Path(config["model_dir"]))

    if not state["evals"] and held:
        validate()  # before training: the baseline every later validation is compared with
    setup_s = time.perf_counter() - t_start  # model load + DeepSpeed init (+ its op build on first use)
    cpu_s = 0.0  # this process's CPU seconds in the optimizer steps of this attempt (benchmarks)
    engine.train()
    while state["step"] < total and not state["stopped_early"]:
        t0, c0 = time.perf_counter(), time.process_time()
        common.reset_peak_memory()
        k0 = state["step"] * cfg.grad_accum
        micro_batches = [[train[i] for i in schedule.micro_batch(k0 + m, rank)]
                         for m in range(cfg.grad_accum) for rank in range(world)]
        norm = sum(method.weight(b) for b in micro_batches)  # the whole step's weight, every rank's part
        loss_sum = weight_sum = tokens = 0.0
        ids: list[str] = []
        for m in range(cfg.grad_accum):
            samples = micro_batches[m * world + r]
            ids += [s["id"] for s in samples]
            out = method.micro(engine, samples)
            engine.backward(out.loss * common.step_weight(out.weight, norm, cfg.grad_accum, world))
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            loss_sum += float(out.loss.detach()) * out.weight
            weight_sum += out.weight
            tokens += out.tokens
        loss_sum, weight_sum, tokens = common.all_reduce_sum([loss_sum, weight_sum, tokens])
        every_rank_ids = common.all_gather_object(ids)
        step_s = time.perf_counter() - t0
        state["step"] += 1
        state["history"].append({"step": state["step"], "loss": loss_sum / max(weight_sum, 1e-12),
                                 "tokens": int(tokens), "seconds": step_s, "sample_ids": every_rank_ids,
                                 "peak_mem_mb": common.peak_memory_mb()})
        state["tokens"] += int(tokens)
        state["train_s"] += step_s
        cpu_s += time.process_time() - c0
        tracker.log(state["step"], {"train/loss": state["history"][-1]["loss"]})
        if progress is not None:
            progress.update(state["step"], total, loss=state["history"][-1]["loss"],
                            tokens_per_s=state["tokens"] / max(state["train_s"], 1e-9))
        if hooks.fail_at_step == state["step"] and restored is None and r == 0:
            os._exit(1)  # fault injection for the resume tests: a worker process dies mid-run
        if held and ((cfg.eval_every and state["step"] % cfg.eval_every == 0) or state["step"] == total):
            validate()
        running = state["step"] < total and not state["stopped_early"]
        at_ckpt = state["step"] % cfg.checkpoint_every == 0 and running
        at_report = hooks.report_evals and state["evals"] and state["evals"][-1]["step"] == state["step"] and running
        if at_ckpt:
            checkpoint.report_checkpoint(engine, state, method.report(state))
        elif at_report:
            session.current().report(method.report(state))  # every rank reports (Train V2 waits for all)

    tracker.close()
    method.save_final(engine, state, config["base_path"], Path(config["model_dir"]))
    if r == 0:
        TrainHistory(steps=[StepRow(**s) for s in state["history"]],
                     evals=[EvalRow(**e) for e in state["evals"]]).write(config["history_path"])
    losses = [s["loss"] for s in state["history"]]
    # The last checkpoint carries the final metrics: Train V2's Result.metrics are those of the latest
    # checkpoint, and re-running a finished run resumes here instead of training again.
    checkpoint.report_checkpoint(engine, state, {
        **method.report(state),  # the keys of the intermediate reports (Tune needs its metric in each)
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "steps": state["step"], "tokens": state["tokens"], "tokens_per_s": state["tokens"] / max(state["train_s"], 1e-9),
        "train_s": state["train_s"], "worker_setup_s": setup_s, "worker_total_s": time.perf_counter() - t_start,
        # the step of the checkpoint this attempt resumed from (a worker restart or a re-submitted run); None: fresh
        "resumed_from_step": resumed_from,
        "train_cpu_s": common.all_reduce_sum([cpu_s])[0],  # all ranks, this attempt only
        "allocator": common.allocator_in_use(),  # rank 0's malloc: resources.allocator may have fallen back
        **method.summary(state),
    })


# ---------------------------------------------------------------- the driver
class TrainResult(BaseModel):
    """What a training run leaves: the model directory, the per-step history file and the final metrics."""

    model_dir: str
    history_path: str
    metrics: dict

    @property
    def history(self) -> TrainHistory:
        return TrainHistory.read(self.history_path)


def run_training(method: Method, train: list[dict], held: list[dict], base_path: str, out_dir: Path,
                 run_name: str, quiet: bool, options: Optional[TrainOptions] = None) -> TrainResult:
    """Train `method` on `train` (validating on `held`) as a Ray Train run (or, with `options.in_process`, in
    this process: a sweep trial's); Ray initialised by the caller.

    Checkpoints go to out_dir/ray/<run_name> (the same out_dir and run_name resume); the model to out_dir/model,
    the history to out_dir/history.jsonl."""
    import ray
    from ray.train.torch import TorchTrainer

    options = options or TrainOptions()
    out_dir = Path(out_dir).resolve()
    res: TrainResources = method.cfg.resources
    config = {"method": method, "data_ref": ray.put((train, held)), "base_path": base_path,
              "model_dir": str(out_dir / "model"), "history_path": str(out_dir / HISTORY_FILE),
              "hooks": options.hooks.model_dump(), "progress": options.progress,
              "tracking": options.tracking.model_dump() if options.tracking else None}
    t_fit = time.perf_counter()
    if options.in_process:
        if res.num_workers != 1 or res.use_gpu:  # the sweep's config check rejects these first
            raise ValueError(f"training in process runs one CPU rank, not num_workers={res.num_workers}, "
                             f"use_gpu={res.use_gpu}")
        # the directory a TorchTrainer's RunConfig(storage_path=out_dir/ray, name=run_name) keeps checkpoints in
        metrics = session.run_in_trial(train_loop, config, out_dir / "ray" / run_name)
    else:
        trainer = TorchTrainer(train_loop, train_loop_config=config, scaling_config=common.scaling_config(res),
                               run_config=common.run_config(out_dir, run_name, res, quiet=quiet,
                                                            callbacks=options.callbacks))
        metrics = common.fit(trainer)
    metrics["fit_s"] = time.perf_counter() - t_fit
    return TrainResult(model_dir=config["model_dir"], history_path=config["history_path"], metrics=metrics)
