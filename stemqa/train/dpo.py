"""DPO on Ray Train + DeepSpeed ZeRO with reference log-probs computed once by a Ray Data job.

1. `reference_logps`: a Ray Data `map_batches` job (one actor holding the reference model) scores every pair's
   chosen and rejected completion; the sums are stored beside the pairs in
   `pairs_dir/ref_logps/<key>/<split>.jsonl` and reused when present, so training holds one model, not two. The
   key is a hash of what the scores depend on: the reference model's files (weights, tokenizer, config), every
   pair's id and texts, and max_len; retraining the reference into the same directory or editing a pair
   computes them again.
2. The one training loop (`stemqa.train.loop`) runs `DPOMethod`: each micro-batch's mean pair loss, validation
   every `eval_every` steps (reward accuracy, reward margin, loss; summed over ranks), the best model by val
   reward accuracy kept at `out_dir/model`, early stop after `patience` evals without improvement.
3. The test split is scored with the best model by the same Ray Data job (policy log-probs) after training.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional

from stemqa.config.schema import DPOConfig, StemqaConfig
from stemqa.data.preference import SPLITS, Pair, read_pairs
from stemqa.train import batches, checkpoint, common
from stemqa.train.loop import Method, Micro, TrainOptions, TrainResult, run_training
from stemqa.train.losses import dpo_loss, prefers_chosen

Progress = Optional[Callable[..., None]]  # update(done, total): rows scored so far (stemqa.progress)


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


def collate_pairs(samples: list[dict], pad_id: int, packing: bool = False) -> dict:
    """Chosen sequences first, then rejected (as TRL). Unpacked: completions aligned (`batches.completion_batch`);
    packed: all 2 x len(samples) sequences in one padding-free row (`batches.pack`, `dpo.packing`)."""
    seqs = [(s["prompt"], s[k]) for k in ("chosen", "rejected") for s in samples]
    if packing:
        return {**batches.pack([{"prompt": p, "completion": c} for p, c in seqs]), "sequences": len(seqs)}
    return batches.completion_batch([p for p, _ in seqs], [c for _, c in seqs], pad_id)


def sequence_logps(model, batch: dict):
    """Sum of log p(token) over each completion -> (chosen [B], rejected [B], chosen lengths, rejected lengths)."""
    import torch

    if "targets" in batch:  # packed: per-token log-probs of the whole row, summed per sequence
        tok = batches.packed_token_logps(model, batch)
        seq = batch["sample_of"].to(tok.device)
        logps = torch.zeros(batch["sequences"], dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)
        lens = torch.bincount(seq, minlength=batch["sequences"])
    else:
        logps = batches.completion_token_logps(model, batch).sum(-1)
        lens = batch["completion_mask"].sum(-1).to(logps.device)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:], lens[:n], lens[n:]


class LogpScorer:
    """Ray Data actor: one model, scores {id, prompt, chosen, rejected} batches -> summed completion log-probs."""

    def __init__(self, model_path: str, max_len: int, threads: int, packing: bool = False):
        import torch

        from stemqa.models import packed_attention
        from stemqa.models.loader import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        attn = {"attn_implementation": packed_attention.register()} if packing else {}
        self.model = load_causal_lm(model_path, dtype="float32" if not torch.cuda.is_available() else "auto", **attn)
        self.tok = load_tokenizer(model_path)
        self.max_len, self.packing = max_len, packing

    def __call__(self, batch: dict) -> dict:
        import torch

        samples = [encode_pair(self.tok, Pair(i, p, c, r, "ray-data"), self.max_len)
                   for i, p, c, r in zip(batch["id"], batch["prompt"], batch["chosen"], batch["rejected"])]
        with torch.no_grad():
            chosen, rejected, c_len, r_len = sequence_logps(
                self.model, collate_pairs(samples, self.tok.pad_token_id, self.packing))
        return {"id": list(batch["id"]), "split": list(batch["split"]), "chosen_logp": chosen.cpu().numpy(),
                "rejected_logp": rejected.cpu().numpy(), "chosen_len": c_len.cpu().numpy(),
                "rejected_len": r_len.cpu().numpy()}


def score_pairs(model_path: str, pairs: dict[str, list[Pair]], cfg: DPOConfig,
                progress: Progress = None) -> dict[str, dict[str, dict]]:
    """Run `LogpScorer` over the pairs of every split as one Ray Data job -> {split: {id: scores}}."""
    import ray.data

    rows = [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "split": split}
            for split, items in pairs.items() for p in items]
    ds = ray.data.from_items(rows).map_batches(
        LogpScorer, fn_constructor_kwargs={"model_path": model_path, "max_len": cfg.max_len,
                                           "threads": max(1, int(cfg.ref_cpus)), "packing": cfg.packing},
        batch_size=cfg.ref_batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.ref_cpus)
    out: dict[str, dict[str, dict]] = {split: {} for split in pairs}
    for n, row in enumerate(ds.iter_rows(), start=1):  # joined by id below, so the output order does not matter
        out[row["split"]][row["id"]] = {k: float(row[k]) for k in
                                        ("chosen_logp", "rejected_logp", "chosen_len", "rejected_len")}
        if progress is not None:
            progress(n, len(rows))
    return out


def model_fingerprint(path: str) -> str:
    """sha256 over every file of a model (a directory: weights, tokenizer, config; or one .gguf file), by name."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def reference_key(reference_path: str, pairs: dict[str, list[Pair]], cfg: DPOConfig) -> str:
    """What the reference log-probs depend on: the reference model's files, every pair's text, max_len."""
    h = hashlib.sha256(f"{model_fingerprint(reference_path)}:{cfg.max_len}".encode())
    for split in sorted(pairs):
        for p in pairs[split]:
            h.update(json.dumps([split, p.id, p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()[:16]


def reference_logps(pairs_dir: Path, reference_path: str, pairs: dict[str, list[Pair]], cfg: DPOConfig,
                    progress: Progress = None) -> dict:
    """Reference log-probs per split, computed once (Ray Data) and stored beside the pairs; reused if there."""
    ref_dir = Path(pairs_dir) / "ref_logps" / reference_key(reference_path, pairs, cfg)
    files = {split: ref_dir / f"{split}.jsonl" for split in pairs}
    if all(f.exists() for f in files.values()):
        stored = {s: {r["id"]: r for r in map(json.loads, f.read_text().splitlines())} for s, f in files.items()}
        if all(set(stored[s]) == {p.id for p in pairs[s]} for s in pairs):
            return {"dir": str(ref_dir), "computed": False, "scores": stored}
    scores = score_pairs(reference_path, pairs, cfg, progress)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for split, by_id in scores.items():
        files[split].write_text("".join(json.dumps({"id": i, **v}) + "\n" for i, v in by_id.items()))
    (ref_dir / "reference.json").write_text(json.dumps({"reference": str(reference_path), "max_len": cfg.max_len}))
    return {"dir": str(ref_dir), "computed": True, "scores": scores}


# ---------------------------------------------------------------- the method in the training loop
def pair_losses(engine, samples: list[dict], dpo: DPOConfig, pad_id: int) -> dict:
    import torch

    batch = collate_pairs(samples, pad_id, dpo.packing)
    chosen, rejected, c_len, r_len = sequence_logps(engine, batch)
    ref_c = torch.tensor([s["ref_chosen"] for s in samples], dtype=chosen.dtype, device=chosen.device)
    ref_r = torch.tensor([s["ref_rejected"] for s in samples], dtype=chosen.dtype, device=chosen.device)
    out = dpo_loss(dpo.loss, chosen, rejected, ref_c, ref_r, dpo.beta, dpo.label_smoothing, c_len, r_len)
    out["tokens"] = batches.batch_tokens(batch)
    return out


class DPOMethod(Method):
    """DPO in the loop: each micro-batch's mean pair loss (every micro-batch weighs the same); validation = reward
    accuracy, reward margin and loss; the best model by val reward accuracy is kept, with early stopping."""

    report_eval_prefix = "val_"

    def weight(self, samples: list[dict]) -> float:
        return 1.0

    def micro(self, engine, samples: list[dict]) -> Micro:
        out = pair_losses(engine, samples, self.cfg, self.pad_id)
        return Micro(out["losses"].mean(), 1.0, out["tokens"])

    def eval_sums(self, engine, samples: list[dict]) -> list[float]:
        out = pair_losses(engine, samples, self.cfg, self.pad_id)
        return [float(out["correct"].sum()), float(out["margin"].sum()), float(out["losses"].sum()),
                float(len(samples))]

    def eval_metrics(self, sums: list[float]) -> dict:
        acc, margin, loss, n = sums
        return {"reward_accuracy": acc / max(n, 1), "reward_margin": margin / max(n, 1), "loss": loss / max(n, 1)}

    def on_eval(self, state: dict, ev: dict) -> bool:
        best = state["method"]
        if "best_acc" not in best:  # the validation before training: the bar to beat
            best.update(best_acc=ev["reward_accuracy"], best_step=ev["step"], bad_evals=0)
            return False
        if ev["reward_accuracy"] > best["best_acc"]:
            best.update(best_acc=ev["reward_accuracy"], best_step=ev["step"], bad_evals=0)
            return True
        best["bad_evals"] += 1
        state["stopped_early"] = best["bad_evals"] >= self.cfg.patience
        return False

    def report(self, state: dict) -> dict:
        return {**super().report(state), "val_reward_accuracy_best": state["method"].get("best_acc")}

    def summary(self, state: dict) -> dict:
        best = state["method"]
        return {"stopped_early": state["stopped_early"], "best_step": best.get("best_step"),
                "val_reward_accuracy_before": state["evals"][0]["reward_accuracy"],
                "val_reward_accuracy_best": best.get("best_acc")}

    def save_final(self, engine, state: dict, base_path: str, model_dir: Path) -> None:
        if state["method"].get("best_step") == 0 and common.rank() == 0:
            checkpoint.save_hf_model(None, base_path, None, model_dir)  # never beat the start: keep the start


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
    return {"reward_accuracy": float(prefers_chosen(chosen - rejected).mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "n": len(ids)}


def run_dpo(cfg: StemqaConfig, pairs_dir: Path, out_dir: Path, base_model: str, run_name: str = "dpo",
            options: Optional[TrainOptions] = None, ref_progress: Progress = None) -> TrainResult:
    """DPO from `base_model` on pairs_dir/{train,val,test}.jsonl (from `prepare_pairs`); Ray initialised by the
    caller. The metrics hold val reward accuracy before/best and test reward accuracy; the per-step history
    (losses, validations, sample ids) is out_dir/history.jsonl. `ref_progress(done, total)` follows the reference
    log-prob job."""
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
    ref = reference_logps(pairs_dir, ref_path, pairs, dpo, ref_progress)
    ref_s = time.perf_counter() - t_ref
    tok = load_tokenizer(base_path)
    result = run_training(DPOMethod(dpo, tok.pad_token_id),
                          _with_ref(tok, pairs["train"], ref["scores"]["train"], dpo.max_len),
                          _with_ref(tok, pairs["val"], ref["scores"]["val"], dpo.max_len),
                          base_path, out_dir, run_name, cfg.cluster.quiet, options)
    metrics = result.metrics
    if pairs["test"]:
        t_test = time.perf_counter()
        policy = score_pairs(str(out_dir / "model"), {"test": pairs["test"]}, dpo)["test"]
        test = reward_accuracy(policy, ref["scores"]["test"], dpo.beta)
        metrics.update(test_reward_accuracy=test["reward_accuracy"], test_reward_margin=test["reward_margin"],
                       test_pairs=test["n"], test_score_s=time.perf_counter() - t_test)
    metrics.update(ref_logps_s=ref_s, ref_logps_computed=ref["computed"], ref_logps_dir=ref["dir"],
                   train_pairs=len(pairs["train"]), val_pairs=len(pairs["val"]), wall_s=time.perf_counter() - t0)
    return result
