"""Supervised fine-tuning on harness-format MCQs or open-ended Q/A: Ray Train `TorchTrainer` + DeepSpeed ZeRO.

Each MCQ becomes `harness_prompt(q)` + ` <letter>` + eos, each open-ended record (`sft.data: qa`)
`Question: ..\nAnswer:` + ` <answer>` + eos; the loss is on the completion tokens only (only
their logits are computed, see `batches.completion_batch`). The driver tokenizes once and puts the samples in
the object store; the one training loop (`stemqa.train.loop`) runs `SFTMethod`'s loss on the micro-batches of
`common.Schedule`, so the order survives a resume. The result is a plain HF directory at `out_dir/model` that
`stemqa.models.load_causal_lm` loads, and the per-step history at `out_dir/history.jsonl`.

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

import time
from pathlib import Path
from typing import Optional

from stemqa.config.schema import StemqaConfig
from stemqa.data.mcq import MCQ, read_records
from stemqa.data.prompt import harness_prompt, target
from stemqa.data.qa import QA, load_qa_file, qa_prompt, qa_target
from stemqa.train import batches
from stemqa.train.loop import Method, Micro, TrainOptions, TrainResult, run_training

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
    """Unpacked: left-padded prompts + right-padded completions. Packed: `batches.pack`. Loss on completion tokens
    only."""
    if packing:
        return batches.pack(samples)
    return batches.completion_batch([s["prompt"] for s in samples], [s["completion"] for s in samples], pad_id)


def completion_loss(model, batch: dict):
    """(mean loss over completion tokens, their count): the prompt is masked by construction."""
    if "targets" in batch:
        logp = batches.packed_token_logps(model, batch)
        return -logp.mean(), int(logp.numel())
    logp = batches.completion_token_logps(model, batch)
    n = batch["completion_mask"].sum()
    return -logp.sum() / n.clamp(min=1), int(n)


def split_eval(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out: a seeded share of the samples for the eval loss."""
    import numpy as np

    n_eval = int(round(len(samples) * fraction))
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:n_eval].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


class SFTMethod(Method):
    """SFT in the loop: each micro-batch's mean completion-token loss, weighted by its completion tokens (so the
    optimizer step is the mean over all the step's completion tokens); validation = the held-out loss."""

    report_eval_prefix = "eval_"

    def warmup_steps(self, total: int) -> int:
        return int(self.cfg.warmup_ratio * total)

    def weight(self, samples: list[dict]) -> float:
        return float(sum(len(s["completion"]) for s in samples))

    def micro(self, engine, samples: list[dict]) -> Micro:
        batch = collate(samples, self.pad_id, self.cfg.packing)
        loss, n = completion_loss(engine, batch)
        return Micro(loss, float(n), batches.batch_tokens(batch))

    def eval_sums(self, engine, samples: list[dict]) -> list[float]:
        loss, n = completion_loss(engine, collate(samples, self.pad_id, self.cfg.packing))
        return [float(loss) * n, float(n)]

    def eval_metrics(self, sums: list[float]) -> dict:
        return {"loss": sums[0] / max(sums[1], 1.0)}

    def summary(self, state: dict) -> dict:
        evals = state["evals"]
        return {"eval_loss_before": evals[0]["loss"] if evals else None,
                "eval_loss": evals[-1]["loss"] if len(evals) > 1 else None}


def prepare_samples(cfg: StemqaConfig, train_path: Path, tok) -> tuple[list[dict], list[dict]]:
    read, encode = ENCODERS[cfg.sft.data]
    records = read(train_path)
    if not records:
        raise ValueError(f"{train_path}: no {cfg.sft.data} records to train on (sft.data={cfg.sft.data})")
    samples = [encode(tok, r, cfg.sft.max_seq_len) for r in records]
    return split_eval(samples, cfg.sft.eval_fraction, cfg.sft.seed)


def run_sft(cfg: StemqaConfig, train_path: Path, out_dir: Path, base_model: Optional[str] = None,
            run_name: str = "sft", options: Optional[TrainOptions] = None) -> TrainResult:
    """Fine-tune `base_model` (default cfg.model.name) on the records in `train_path` (sft.data: mcq or qa).

    Ray must be initialised by the caller. Checkpoints go to out_dir/ray/<run_name> (re-running with the same
    out_dir and run_name resumes); the model to out_dir/model, the per-step history to out_dir/history.jsonl.
    """
    from stemqa.models.loader import load_tokenizer, resolve_model

    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = str(resolve_model(base_model or cfg.model.name, cfg.model.revision))
    tok = load_tokenizer(base_path)
    train, held = prepare_samples(cfg, Path(train_path), tok)
    result = run_training(SFTMethod(cfg.sft, tok.pad_token_id), train, held, base_path, out_dir, run_name,
                          cfg.cluster.quiet, options)
    result.metrics.update(wall_s=time.perf_counter() - t0, train_samples=len(train), eval_samples=len(held))
    return result
