"""DPO on Ray Train + DeepSpeed ZeRO with reference log-probs computed once by a Ray Data job.

1. `reference_logps`: a Ray Data `map_batches` job (one actor holding the reference model) scores every pair's
   chosen and rejected completion; the sums are stored beside the pairs in
   `pairs_dir/ref_logps/<key>/<split>.jsonl` (key = reference model + max_len) and reused when present, so
   training holds one model, not two.
2. `train_loop`: each worker trains the policy on its micro-batches (`common.Schedule`), validates every
   `eval_every` steps (reward accuracy, reward margin, loss; summed over ranks), keeps the best model by val
   reward accuracy at `out_dir/model`, and stops early after `patience` evals without improvement.
3. The test split is scored with the best model by the same Ray Data job (policy log-probs) after training.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from stemqa.config.schema import DPOConfig, StemqaConfig
from stemqa.data.preference import SPLITS, Pair, read_pairs
from stemqa.tracking import LiveTarget, StepLogger
from stemqa.train import common
from stemqa.train.losses import dpo_loss


# ---------------------------------------------------------------- tokens and log-probs (shared by both jobs)
def encode_pair(tok, pair: Pair, max_len: int) -> dict:
    """Prompt ids and each completion's ids + eos, completions cut so prompt + completion <= max_len."""
    prompt = tok(pair.prompt, add_special_tokens=True)["input_ids"]
    room = max_len - len(prompt)
    if room < 2:
        raise ValueError(f"pair {pair.id}: prompt of {len(prompt)} tokens leaves no room under max_len {max_len}")
    comp = {k: (tok(getattr(pair, k), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:room]
            for k in ("chosen", "rejected")}
    return {"id": pair.id, "prompt": prompt, **comp}


def collate_pairs(samples: list[dict], pad_id: int) -> dict:
    """Chosen sequences first, then rejected (as TRL), completions aligned (see `common.completion_batch`)."""
    prompts = [s["prompt"] for s in samples]
    return common.completion_batch(prompts + prompts, [s["chosen"] for s in samples] +
                                   [s["rejected"] for s in samples], pad_id)


def sequence_logps(model, batch: dict):
    """Sum of log p(token) over each completion -> (chosen [B], rejected [B], chosen lengths, rejected lengths)."""
    logps = common.completion_token_logps(model, batch).sum(-1)
    lens = batch["completion_mask"].sum(-1).to(logps.device)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:], lens[:n], lens[n:]


class LogpScorer:
    """Ray Data actor: one model, scores {id, prompt, chosen, rejected} batches -> summed completion log-probs."""

    def __init__(self, model_path: str, max_len: int, threads: int):
        import torch

        from stemqa.models.loader import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        self.model = load_causal_lm(model_path, dtype="float32" if not torch.cuda.is_available() else "auto")
        self.tok = load_tokenizer(model_path)
        self.max_len = max_len

    def __call__(self, batch: dict) -> dict:
        import torch

        samples = [encode_pair(self.tok, Pair(i, p, c, r, "ray-data"), self.max_len)
                   for i, p, c, r in zip(batch["id"], batch["prompt"], batch["chosen"], batch["rejected"])]
        with torch.no_grad():
            chosen, rejected, c_len, r_len = sequence_logps(self.model, collate_pairs(samples, self.tok.pad_token_id))
        return {"id": list(batch["id"]), "split": list(batch["split"]), "chosen_logp": chosen.cpu().numpy(),
                "rejected_logp": rejected.cpu().numpy(), "chosen_len": c_len.cpu().numpy(),
                "rejected_len": r_len.cpu().numpy()}


def score_pairs(model_path: str, pairs: dict[str, list[Pair]], cfg: DPOConfig) -> dict[str, dict[str, dict]]:
    """Run `LogpScorer` over the pairs of every split as one Ray Data job -> {split: {id: scores}}."""
    import ray.data

    rows = [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "split": split}
            for split, items in pairs.items() for p in items]
    ds = ray.data.from_items(rows).map_batches(
        LogpScorer, fn_constructor_kwargs={"model_path": model_path, "max_len": cfg.max_len,
                                           "threads": max(1, int(cfg.ref_cpus))},
        batch_size=cfg.ref_batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.ref_cpus)
    out: dict[str, dict[str, dict]] = {split: {} for split in pairs}
    for row in ds.iter_rows():  # joined by id below, so the output order does not matter
        out[row["split"]][row["id"]] = {k: float(row[k]) for k in
                                        ("chosen_logp", "rejected_logp", "chosen_len", "rejected_len")}
    return out


def reference_logps(pairs_dir: Path, reference_path: str, pairs: dict[str, list[Pair]], cfg: DPOConfig) -> dict:
    """Reference log-probs per split, computed once (Ray Data) and stored beside the pairs; reused if there."""
    key = hashlib.sha256(f"{Path(reference_path).resolve()}:{cfg.max_len}".encode()).hexdigest()[:12]
    ref_dir = Path(pairs_dir) / "ref_logps" / key
    files = {split: ref_dir / f"{split}.jsonl" for split in pairs}
    if all(f.exists() for f in files.values()):
        stored = {s: {r["id"]: r for r in map(json.loads, f.read_text().splitlines())} for s, f in files.items()}
        if all(set(stored[s]) == {p.id for p in pairs[s]} for s in pairs):
            return {"dir": str(ref_dir), "computed": False, "scores": stored}
    scores = score_pairs(reference_path, pairs, cfg)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for split, by_id in scores.items():
        files[split].write_text("".join(json.dumps({"id": i, **v}) + "\n" for i, v in by_id.items()))
    (ref_dir / "reference.json").write_text(json.dumps({"reference": str(reference_path), "max_len": cfg.max_len}))
    return {"dir": str(ref_dir), "computed": True, "scores": scores}


# ---------------------------------------------------------------- the Ray Train worker
def _evaluate(engine, samples: list[dict], dpo: DPOConfig, pad_id: int) -> dict:
    """Reward accuracy, mean reward margin and mean loss over `samples`, sharded over ranks and summed."""
    import torch

    r, world = common.rank(), _world()
    mine = [samples[i] for i in common.eval_shard(len(samples), r, world)]
    acc = margin = loss = 0.0
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), dpo.batch_size):
            out = _pair_losses(engine, mine[i:i + dpo.batch_size], dpo, pad_id)
            acc += float(out["correct"].sum())
            margin += float(out["margin"].sum())
            loss += float(out["losses"].sum())
    engine.train()
    acc, margin, loss, n = common.all_reduce_sum([acc, margin, loss, float(len(mine))])
    return {"reward_accuracy": acc / max(n, 1), "reward_margin": margin / max(n, 1), "loss": loss / max(n, 1)}


def _pair_losses(engine, samples: list[dict], dpo: DPOConfig, pad_id: int) -> dict:
    import torch

    batch = collate_pairs(samples, pad_id)
    chosen, rejected, c_len, r_len = sequence_logps(engine, batch)
    ref_c = torch.tensor([s["ref_chosen"] for s in samples], dtype=chosen.dtype, device=chosen.device)
    ref_r = torch.tensor([s["ref_rejected"] for s in samples], dtype=chosen.dtype, device=chosen.device)
    out = dpo_loss(dpo.loss, chosen, rejected, ref_c, ref_r, dpo.beta, dpo.label_smoothing, c_len, r_len)
    out["tokens"] = int(batch["attention_mask"].sum())
    return out


def _world() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def _save_best(engine, dpo: DPOConfig, config: dict) -> None:
    weights = common.full_state_dict(engine, dpo.resources.zero_stage)  # a collective: every rank calls it
    if common.rank() == 0:
        common.save_hf_model(weights, config["base_path"], dpo.lora, Path(config["model_dir"]))


def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import torch

    t_start = time.perf_counter()
    dpo: DPOConfig = DPOConfig.model_validate(config["dpo"])
    res = dpo.resources
    common.worker_setup(res)
    train, val = ray.get(config["data_ref"])
    pad_id = config["pad_id"]
    r, world = common.rank(), _world()
    schedule = common.Schedule(len(train), dpo.batch_size, world, dpo.grad_accum, dpo.seed)
    total = schedule.total_steps(dpo.epochs, dpo.max_steps)
    torch.manual_seed(dpo.seed + r)
    model = common.load_train_model(config["base_path"], dpo.lora, common.use_bf16(res), zero_stage=res.zero_stage)
    engine = common.make_engine(model, res, dpo.lr, dpo.batch_size, dpo.grad_accum, total)
    restored = common.restore_checkpoint(engine)
    resumed_from = restored["step"] if restored else None  # `state` below is this dict and moves on
    tracker = StepLogger.open(config.get("tracking"), r)  # the stage's tracker runs, live (rank 0)
    state = restored or {
        "step": 0, "losses": [], "tokens": 0, "train_s": 0.0, "evals": [], "best_acc": None, "best_step": None,
        "bad_evals": 0, "stopped_early": False, "sample_ids": []}
    if not state["evals"]:
        before = _evaluate(engine, val, dpo, pad_id)
        state["evals"].append({"step": 0, **before})
        tracker.log(0, {f"val/{k}": v for k, v in before.items()})
        state["best_acc"], state["best_step"] = before["reward_accuracy"], 0
    setup_s = time.perf_counter() - t_start
    cpu_s = 0.0  # this process's CPU seconds in the optimizer steps of this attempt (benchmarks)
    engine.train()
    while state["step"] < total and not state["stopped_early"]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = tokens = 0.0
        for micro in range(dpo.grad_accum):
            idx = schedule.micro_batch(state["step"] * dpo.grad_accum + micro, r)
            if config.get("log_sample_ids"):
                state["sample_ids"].append([train[i]["id"] for i in idx])
            out = _pair_losses(engine, [train[i] for i in idx], dpo, pad_id)
            engine.backward(out["losses"].mean())
            engine.step()
            loss_sum += float(out["losses"].detach().mean())
            tokens += out["tokens"]
        loss_sum, tokens = common.all_reduce_sum([loss_sum, tokens])
        state["step"] += 1
        state["losses"].append(loss_sum / (dpo.grad_accum * world))
        tracker.log(state["step"], {"train/loss": state["losses"][-1]})
        state["tokens"] += int(tokens)
        state["train_s"] += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        if config.get("fail_at_step") == state["step"] and restored is None and r == 0:
            os._exit(1)  # fault injection for the resume tests: a worker process dies mid-run
        if state["step"] % dpo.eval_every == 0 or state["step"] == total:
            ev = _evaluate(engine, val, dpo, pad_id)
            state["evals"].append({"step": state["step"], **ev})
            tracker.log(state["step"], {f"val/{k}": v for k, v in ev.items()})
            if ev["reward_accuracy"] > state["best_acc"]:
                state["best_acc"], state["best_step"], state["bad_evals"] = ev["reward_accuracy"], state["step"], 0
                _save_best(engine, dpo, config)
            else:
                state["bad_evals"] += 1
                state["stopped_early"] = state["bad_evals"] >= dpo.patience
        # report_evals (set by sweeps): a metrics-only report after each eval, what ASHA compares trials by;
        # then every report carries the latest eval, since Tune rejects a report without the scheduler's metric.
        report_evals = config.get("report_evals")
        running = state["step"] < total and not state["stopped_early"]
        at_ckpt = state["step"] % dpo.checkpoint_every == 0 and running
        at_report = bool(report_evals) and state["evals"][-1]["step"] == state["step"] and running
        if at_ckpt or at_report:
            metrics = {"step": state["step"], "train_loss": state["losses"][-1]}
            if report_evals:
                metrics.update(_eval_metrics(state))
            if at_ckpt:
                common.report_checkpoint(engine, state, metrics)
            else:
                ray.train.report(metrics)  # every rank reports (Train V2 waits for all)

    tracker.close()
    if state["best_step"] == 0 and r == 0:  # never beat the start: the best model is the starting one
        common.save_hf_model(None, config["base_path"], None, Path(config["model_dir"]))
    common.report_checkpoint(engine, state, {
        "train_loss_first": state["losses"][0] if state["losses"] else None,
        "train_loss_last": state["losses"][-1] if state["losses"] else None,
        "steps": state["step"], "stopped_early": state["stopped_early"], "best_step": state["best_step"],
        "val_reward_accuracy_before": state["evals"][0]["reward_accuracy"],
        "val_reward_accuracy_best": state["best_acc"], "evals": state["evals"],
        "tokens": state["tokens"], "tokens_per_s": state["tokens"] / max(state["train_s"], 1e-9),
        "train_s": state["train_s"], "worker_setup_s": setup_s, "worker_total_s": time.perf_counter() - t_start,
        "sample_ids": state["sample_ids"],
        # the step of the checkpoint this attempt resumed from (a worker restart or a re-submitted run); None: fresh
        "resumed_from_step": resumed_from,
        "train_cpu_s": common.all_reduce_sum([cpu_s])[0],  # all ranks, this attempt only
        "allocator": common.allocator_in_use(),  # rank 0's malloc: resources.allocator may have fallen back
        "losses": state["losses"],  # train loss per optimizer step, for stemqa.tracking and the report
        "tracked_live": bool(config.get("tracking")),  # the steps are in the trackers already
        "step": state["step"], "train_loss": state["losses"][-1] if state["losses"] else None,
        **_eval_metrics(state),  # the keys of the intermediate reports
    })


def _eval_metrics(state: dict) -> dict:
    """The latest validation and the best so far, as reported to Ray Train (and through it to Tune)."""
    last = state["evals"][-1]
    return {"val_reward_accuracy": last["reward_accuracy"], "val_reward_margin": last["reward_margin"],
            "val_loss": last["loss"], "val_reward_accuracy_best": state["best_acc"]}


# ---------------------------------------------------------------- driver
def _with_ref(tok, pairs: list[Pair], ref: dict, max_len: int) -> list[dict]:
    out = []
    for p in pairs:
        s = encode_pair(tok, p, max_len)
        s["ref_chosen"], s["ref_rejected"] = ref[p.id]["chosen_logp"], ref[p.id]["rejected_logp"]
        out.append(s)
    return out


def reward_accuracy(policy: dict, ref: dict, beta: float) -> dict:
    """Reward accuracy and margin of policy vs reference scores (both {id: scores}) on the same pairs."""
    import numpy as np

    ids = sorted(ref)
    chosen = beta * np.array([policy[i]["chosen_logp"] - ref[i]["chosen_logp"] for i in ids])
    rejected = beta * np.array([policy[i]["rejected_logp"] - ref[i]["rejected_logp"] for i in ids])
    return {"reward_accuracy": float((chosen > rejected).mean()), "reward_margin": float((chosen - rejected).mean()),
            "n": len(ids)}


def run_dpo(cfg: StemqaConfig, pairs_dir: Path, out_dir: Path, base_model: str, run_name: str = "dpo",
            log_sample_ids: bool = False,
            fail_at_step: Optional[int] = None, callbacks: Optional[list] = None,
            report_evals: bool = False, tracking: Optional[LiveTarget] = None) -> dict:
    """DPO from `base_model` on pairs_dir/{train,val,test}.jsonl (from `prepare_pairs`); Ray initialised by the
    caller. Returns {"model_dir", "metrics"} with val reward accuracy before/best and test reward accuracy.
    Sweeps pass `callbacks` (Ray Train callbacks, e.g. TuneReportCallback) and `report_evals` (report each
    validation as it happens). `tracking` (stemqa.tracking.open_stage): rank 0 logs each step's train loss and
    each validation to the stage's tracker runs while it trains."""
    import ray
    from ray.train.torch import TorchTrainer

    from stemqa.models.loader import load_tokenizer, resolve_model

    t0 = time.perf_counter()
    dpo = cfg.dpo
    pairs_dir, out_dir = Path(pairs_dir).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = {split: read_pairs(pairs_dir / f"{split}.jsonl") for split in SPLITS}
    for split in ("train", "val"):
        if not pairs[split]:
            raise ValueError(f"{pairs_dir / (split + '.jsonl')}: no pairs (DPO needs train and val pairs)")
    base_path = str(resolve_model(base_model, cfg.model.revision))
    ref_path = str(resolve_model(dpo.reference, cfg.model.revision)) if dpo.reference else base_path
    t_ref = time.perf_counter()
    ref = reference_logps(pairs_dir, ref_path, pairs, dpo)
    ref_s = time.perf_counter() - t_ref
    tok = load_tokenizer(base_path)
    data = (_with_ref(tok, pairs["train"], ref["scores"]["train"], dpo.max_len),
            _with_ref(tok, pairs["val"], ref["scores"]["val"], dpo.max_len))
    config = {"dpo": dpo.model_dump(mode="json"), "data_ref": ray.put(data), "pad_id": tok.pad_token_id,
              "base_path": base_path, "model_dir": str(out_dir / "model"),
              "log_sample_ids": log_sample_ids, "fail_at_step": fail_at_step, "report_evals": report_evals,
              "tracking": tracking.model_dump() if tracking else None}
    trainer = TorchTrainer(train_loop, train_loop_config=config, scaling_config=common.scaling_config(dpo.resources),
                           run_config=common.run_config(out_dir, run_name, dpo.resources, quiet=cfg.cluster.quiet,
                                                        callbacks=callbacks))
    t_fit = time.perf_counter()
    metrics = common.fit(trainer)
    metrics["fit_s"] = time.perf_counter() - t_fit
    if pairs["test"]:
        t_test = time.perf_counter()
        policy = score_pairs(str(out_dir / "model"), {"test": pairs["test"]}, dpo)["test"]
        test = reward_accuracy(policy, ref["scores"]["test"], dpo.beta)
        metrics.update(test_reward_accuracy=test["reward_accuracy"], test_reward_margin=test["reward_margin"],
                       test_pairs=test["n"], test_score_s=time.perf_counter() - t_test)
    metrics.update(ref_logps_s=ref_s, ref_logps_computed=ref["computed"], ref_logps_dir=ref["dir"],
                   train_pairs=len(pairs["train"]), val_pairs=len(pairs["val"]), wall_s=time.perf_counter() - t0)
    return {"model_dir": str(out_dir / "model"), "metrics": metrics}
