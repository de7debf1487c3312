"""Supervised fine-tuning on harness-format MCQs or open-ended Q/A: Ray Train `TorchTrainer` + DeepSpeed ZeRO.

Each MCQ becomes `harness_prompt(q)` + ` <letter>` + eos, each open-ended record (`sft.data: qa`)
`Question: ..\nAnswer:` + ` <answer>` + eos; the loss is on the completion tokens only (only
their logits are computed, see `common.completion_batch`). The driver tokenizes once and puts the samples in
the object store; every worker takes its micro-batches from `common.Schedule`, so the order survives a
resume. The result is a plain HF directory at `out_dir/model` that `stemqa.models.load_causal_lm` loads.

`sft.packing`: each micro-batch is flattened into one padding-free row by transformers'
`DataCollatorWithFlattening` (TRL's `padding_free`), position_ids restarting at 0 for every sample and no
attention mask. From such position_ids transformers builds a block-diagonal causal mask (sdpa/eager/flex) or
FlashAttention's varlen boundaries, so samples never attend to each other (tests/test_sft.py checks the
per-token log-probs equal separate forwards). The micro-batch still holds `batch_size` samples, so the sample
order, the effective batch and resuming are the same as unpacked; what packing removes is the padding. On
sdpa/eager that mask still costs attention over the whole row, so a packed run loads the model with
`stemqa.models.packed_attention`, which attends within each sample's span only.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from stemqa.config.schema import SFTConfig, StemqaConfig
from stemqa.data.mcq import MCQ, read_records
from stemqa.data.prompt import harness_prompt, target
from stemqa.data.qa import QA, load_qa_file, qa_prompt, qa_target
from stemqa.tracking import LiveTarget, StepLogger
from stemqa.train import common

def encode_mcq(tok, q: MCQ, max_seq_len: int) -> dict:
    """Prompt ids and completion ids (` <letter>` + eos); the prompt is cut from the left when too long, so
    the answer is always kept."""
    prompt = tok(harness_prompt(q), add_special_tokens=True)["input_ids"]
    completion = tok(target(q), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    keep = max_seq_len - len(completion)
    if keep < 1:
        raise ValueError(f"sft.max_seq_len {max_seq_len} leaves no room for the prompt of {q.id}")
    return {"id": q.id, "prompt": prompt[-keep:], "completion": completion}


def encode_qa(tok, qa: QA, max_seq_len: int) -> dict:
    """Open-ended: `Question: ..\nAnswer:` -> ` <answer>` + eos. When too long, the answer keeps at least half
    of max_seq_len (its tail, eos included, is cut past that) and the prompt the rest, cut from the left (the
    end of the question, next to the answer, is kept)."""
    prompt = tok(qa_prompt(qa), add_special_tokens=True)["input_ids"]
    completion = tok(qa_target(qa), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(prompt) + len(completion) > max_seq_len:
        completion = completion[:max(max_seq_len - len(prompt), max_seq_len // 2)]
        prompt = prompt[len(prompt) + len(completion) - max_seq_len:]
    return {"id": qa.id, "prompt": prompt, "completion": completion}


# sft.data -> (reader of the training file, encoder of one record)
ENCODERS = {"mcq": (read_records, encode_mcq), "qa": (load_qa_file, encode_qa)}


def collate(samples: list[dict], pad_id: int, packing: bool = False) -> dict:
    """Unpacked: left-padded prompts + right-padded completions. Packed: `pack`. Loss on completion tokens only."""
    if packing:
        return pack(samples)
    return common.completion_batch([s["prompt"] for s in samples], [s["completion"] for s in samples], pad_id)


def pack(samples: list[dict]) -> dict:
    """One padding-free row [1, T] with position_ids restarting per sample (`DataCollatorWithFlattening`).

    `logits_index` are the positions whose next token is a completion token, `targets` those tokens and
    `sample_of` the sample each belongs to: the model computes vocabulary logits at these positions only.
    """
    import torch
    from transformers import DataCollatorWithFlattening

    feats = [{"input_ids": s["prompt"] + s["completion"], "labels": [-100] * len(s["prompt"]) + s["completion"]}
             for s in samples]
    flat = DataCollatorWithFlattening(return_tensors="pt")(feats)
    labels = flat["labels"][0]
    at = (labels != -100).nonzero().squeeze(-1)  # the position of every completion token (never a row start)
    sample_of = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(f["input_ids"]) for f in feats]))
    return {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"], "logits_index": at - 1,
            "targets": labels[at], "sample_of": sample_of[at]}


def packed_token_logps(model, batch: dict):
    """log p(token) of every completion token of a packed row [K] (attention_mask None: transformers then
    derives the per-sample block-diagonal mask from the restarting position_ids)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                logits_to_keep=batch["logits_index"].to(device), use_cache=False)
    return -F.cross_entropy(out.logits[0].float(), batch["targets"].to(device), reduction="none")


def completion_loss(model, batch: dict):
    """(mean loss over completion tokens, their count): the prompt is masked by construction."""
    if "targets" in batch:
        logp = packed_token_logps(model, batch)
        return -logp.mean(), int(logp.numel())
    logp = common.completion_token_logps(model, batch)
    n = batch["completion_mask"].sum()
    return -logp.sum() / n.clamp(min=1), int(n)


def step_weight(n_micro: int, n_step: int, grad_accum: int, world: int) -> float:
    """Factor on a micro-batch's mean loss so that the optimizer step's gradient is the mean over all the step's
    completion tokens, however they are split into micro-batches and ranks (as HF Trainer's
    `num_items_in_batch`, so TRL and we take the same step). DeepSpeed divides each backward by `grad_accum` and
    averages gradients over the `world` ranks; a plain mean per micro-batch would weigh a token of a short
    micro-batch more than one of a long."""
    return n_micro * grad_accum * world / max(n_step, 1)


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens the forward sees."""
    return int(batch["input_ids"].numel()) if "targets" in batch else int(batch["attention_mask"].sum())


def split_eval(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out: a seeded share of the samples for the eval loss."""
    import numpy as np

    n_eval = int(round(len(samples) * fraction))
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:n_eval].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def _eval_loss(engine, samples: list[dict], batch_size: int, pad_id: int, packing: bool = False) -> float:
    """Mean completion-token loss over `samples`, sharded across ranks and summed (token-weighted)."""
    import torch

    r, world = common.rank(), _world()
    mine = [samples[i] for i in common.eval_shard(len(samples), r, world)]
    loss_sum = n_tok = 0.0
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            loss, n = completion_loss(engine, collate(mine[i:i + batch_size], pad_id, packing))
            loss_sum += float(loss) * n
            n_tok += n
    engine.train()
    loss_sum, n_tok = common.all_reduce_sum([loss_sum, n_tok])
    return loss_sum / max(n_tok, 1.0)


def _world() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def train_loop(config: dict) -> None:
    """Ray Train worker: build the engine, resume if a checkpoint exists, train, save the HF model."""
    import ray
    import ray.train
    import torch

    t_start = time.perf_counter()
    sft: SFTConfig = SFTConfig.model_validate(config["sft"])
    res = sft.resources
    common.worker_setup(res)
    train, held = ray.get(config["data_ref"])
    pad_id = config["pad_id"]
    r, world = common.rank(), _world()
    schedule = common.Schedule(len(train), sft.batch_size, world, sft.grad_accum, sft.seed)
    total = schedule.total_steps(sft.epochs, sft.max_steps)
    torch.manual_seed(sft.seed + r)

    model = common.load_train_model(config["base_path"], sft.lora, common.use_bf16(res), packed=sft.packing,
                                     zero_stage=res.zero_stage)
    engine = common.make_engine(model, res, sft.lr, sft.batch_size, sft.grad_accum, total,
                                int(sft.warmup_ratio * total))
    restored = common.restore_checkpoint(engine)
    resumed_from = restored["step"] if restored else None  # `state` below is this dict and moves on
    tracker = StepLogger.open(config.get("tracking"), r)  # the stage's tracker runs, live (rank 0)
    state = restored or {"step": 0, "losses": [], "tokens": 0, "train_s": 0.0,
                                                  "eval_loss_before": None, "sample_ids": []}
    if state["eval_loss_before"] is None and held:
        state["eval_loss_before"] = _eval_loss(engine, held, sft.batch_size, pad_id, sft.packing)
    setup_s = time.perf_counter() - t_start  # model load + DeepSpeed init (+ its op build on first use)
    cpu_s = 0.0  # this process's CPU seconds in the optimizer steps of this attempt (benchmarks)
    engine.train()
    while state["step"] < total:
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = n_tok = tokens = 0.0
        step_ids = []
        n_step = sum(len(train[i]["completion"]) for i in schedule.step_samples(state["step"]))
        for micro in range(sft.grad_accum):
            idx = schedule.micro_batch(state["step"] * sft.grad_accum + micro, r)
            step_ids += [train[i]["id"] for i in idx]
            batch = collate([train[i] for i in idx], pad_id, sft.packing)
            loss, n = completion_loss(engine, batch)
            engine.backward(loss * step_weight(n, n_step, sft.grad_accum, world))
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            loss_sum += float(loss.detach()) * n
            n_tok += n
            tokens += batch_tokens(batch)
        loss_sum, n_tok, tokens = common.all_reduce_sum([loss_sum, n_tok, tokens])
        state["step"] += 1
        state["losses"].append(loss_sum / max(n_tok, 1.0))
        tracker.log(state["step"], {"train/loss": state["losses"][-1]})
        state["tokens"] += int(tokens)
        step_s = time.perf_counter() - t0
        state["train_s"] += step_s
        state.setdefault("step_s", []).append(step_s)  # per step: warm-up vs steady state (benchmarks)
        cpu_s += time.process_time() - c0
        if config.get("fail_at_step") == state["step"] and restored is None and r == 0:
            os._exit(1)  # fault injection for the resume tests: a worker process dies mid-run
        if config.get("log_sample_ids"):
            state["sample_ids"].append(step_ids)  # this rank's ids; rank 0's are kept in the checkpoint
        # report_every (set by sweeps): metrics-only reports with the eval loss, what ASHA compares trials by;
        # then every report carries it, since Tune rejects a report without the scheduler's metric.
        report_every = config.get("report_every")
        at_ckpt = state["step"] % sft.checkpoint_every == 0 and state["step"] < total
        at_report = bool(report_every) and state["step"] % report_every == 0 and state["step"] < total
        if at_ckpt or at_report:
            metrics = {"step": state["step"], "train_loss": state["losses"][-1]}
            if report_every and held:
                metrics["eval_loss"] = _eval_loss(engine, held, sft.batch_size, pad_id, sft.packing)
            if at_ckpt:
                common.report_checkpoint(engine, state, metrics)
            else:
                ray.train.report(metrics)  # every rank reports (Train V2 waits for all)

    eval_loss = _eval_loss(engine, held, sft.batch_size, pad_id, sft.packing) if held else None
    tracker.close()
    weights = common.full_state_dict(engine, res.zero_stage)
    if r == 0:
        common.save_hf_model(weights, config["base_path"], sft.lora, Path(config["model_dir"]))
    # The last checkpoint carries the final metrics: Train V2's Result.metrics are those of the latest
    # checkpoint, and re-running a finished run resumes here instead of training again.
    common.report_checkpoint(engine, state, {
        "train_loss_first": state["losses"][0], "train_loss_last": state["losses"][-1],
        "eval_loss_before": state["eval_loss_before"], "eval_loss": eval_loss, "steps": state["step"],
        "step": state["step"], "train_loss": state["losses"][-1],  # the keys of the intermediate reports
        "tokens": state["tokens"], "tokens_per_s": state["tokens"] / max(state["train_s"], 1e-9),
        "train_s": state["train_s"], "worker_setup_s": setup_s, "worker_total_s": time.perf_counter() - t_start,
        "sample_ids": state["sample_ids"],
        # the step of the checkpoint this attempt resumed from (a worker restart or a re-submitted run); None: fresh
        "resumed_from_step": resumed_from,
        "train_cpu_s": common.all_reduce_sum([cpu_s])[0],  # all ranks, this attempt only
        "allocator": common.allocator_in_use(),  # rank 0's malloc: resources.allocator may have fallen back
        "losses": state["losses"],  # train loss per optimizer step, for stemqa.tracking and the report
        "step_s": state.get("step_s", []),  # wall seconds of each optimizer step (benchmarks: steady state)
        "tracked_live": bool(config.get("tracking")),  # the steps are in the trackers already
    })


def prepare_samples(cfg: StemqaConfig, train_path: Path, tok) -> tuple[list[dict], list[dict]]:
    read, encode = ENCODERS[cfg.sft.data]
    records = read(train_path)
    if not records:
        raise ValueError(f"{train_path}: no {cfg.sft.data} records to train on (sft.data={cfg.sft.data})")
    samples = [encode(tok, r, cfg.sft.max_seq_len) for r in records]
    return split_eval(samples, cfg.sft.eval_fraction, cfg.sft.seed)


def run_sft(cfg: StemqaConfig, train_path: Path, out_dir: Path, base_model: Optional[str] = None,
            run_name: str = "sft", log_sample_ids: bool = False,
            fail_at_step: Optional[int] = None, callbacks: Optional[list] = None,
            report_every: Optional[int] = None, tracking: Optional[LiveTarget] = None) -> dict:
    """Fine-tune `base_model` (default cfg.model.name) on the MCQ records in `train_path`.

    Ray must be initialised by the caller. Checkpoints go to out_dir/ray/<run_name> (re-running with the same
    out_dir and run_name resumes); the model to out_dir/model. Returns {"model_dir", "metrics"}.
    Sweeps pass `callbacks` (Ray Train callbacks, e.g. TuneReportCallback) and `report_every` (report
    {step, train_loss, eval_loss} every N optimizer steps). `tracking` (stemqa.tracking.open_stage): rank 0 logs
    each step's train loss to the stage's tracker runs while it trains.
    """
    import ray
    from ray.train.torch import TorchTrainer

    from stemqa.models.loader import load_tokenizer, resolve_model

    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base_model or cfg.model.name
    base_path = str(resolve_model(base, cfg.model.revision))
    tok = load_tokenizer(base_path)
    train, held = prepare_samples(cfg, Path(train_path), tok)
    config = {"sft": cfg.sft.model_dump(mode="json"), "data_ref": ray.put((train, held)), "pad_id": tok.pad_token_id,
              "base_path": base_path, "model_dir": str(out_dir / "model"),
              "log_sample_ids": log_sample_ids, "fail_at_step": fail_at_step, "report_every": report_every,
              "tracking": tracking.model_dump() if tracking else None}
    trainer = TorchTrainer(train_loop, train_loop_config=config,
                           scaling_config=common.scaling_config(cfg.sft.resources),
                           run_config=common.run_config(out_dir, run_name, cfg.sft.resources,
                                                        quiet=cfg.cluster.quiet, callbacks=callbacks))
    t_fit = time.perf_counter()
    metrics = common.fit(trainer)
    metrics["fit_s"] = time.perf_counter() - t_fit
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["train_samples"], metrics["eval_samples"] = len(train), len(held)
    return {"model_dir": str(out_dir / "model"), "metrics": metrics}
