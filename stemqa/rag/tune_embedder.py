"""Fine-tune the sentence embedder on MMLU subject triplets as a Ray Train job (seed 3.4.4).

Triplets: anchor = a question, positive = another question of the same subject, negative = a question of
another subject. Loss: sentence-transformers' MultipleNegativesRankingLoss (the explicit negative plus the
batch's other positives as negatives). The loop is written out because Ray Train drives it (TorchTrainer with
`prepare_model`, one shard of triplets per worker); sentence-transformers supplies the model, the tokenizer
and the loss. Rank 0 saves the tuned model as a checkpoint, copied to `<out_dir>/model`, a directory every
`embedder` field accepts.
"""
from __future__ import annotations

import random
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from stemqa.data.mcq import MCQ


def split_by_subject(records: list[MCQ], held_out: float, seed: int = 0) -> tuple[list[MCQ], list[MCQ]]:
    """(train, held-out): the same share of every subject's questions held out, for before/after evaluation."""
    by_subject = defaultdict(list)
    for r in records:
        by_subject[r.subject].append(r)
    rng, train, test = random.Random(seed), [], []
    for subject in sorted(by_subject):
        items = by_subject[subject][:]
        rng.shuffle(items)
        n_test = max(1, int(len(items) * held_out)) if len(items) > 2 else 0
        test += items[:n_test]
        train += items[n_test:]
    return train, test


def make_triplets(records: list[MCQ], n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """`n` (anchor, positive, negative) question triplets; needs two subjects with >= 2 questions."""
    by_subject = defaultdict(list)
    for r in records:
        by_subject[r.subject].append(r.question)
    usable = sorted(s for s, qs in by_subject.items() if len(qs) >= 2)
    if not usable or len(by_subject) < 2:
        raise ValueError(f"make_triplets: need >= 2 subjects and one with >= 2 questions; got "
                         f"{ {s: len(q) for s, q in by_subject.items()} }")
    subjects = sorted(by_subject)
    rng, out = random.Random(seed), []
    for _ in range(n):
        s = rng.choice(usable)
        anchor, positive = rng.sample(by_subject[s], 2)
        other = rng.choice([t for t in subjects if t != s])
        out.append((anchor, positive, rng.choice(by_subject[other])))
    return out


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import torch
    from ray import train
    from ray.train.torch import prepare_model
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from stemqa.models import load_embedder

    torch.set_num_threads(config["threads"])  # fractional-CPU workers: as many threads as CPUs held
    torch.manual_seed(config["seed"])
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = load_embedder(config["embedder"])
    loss_fn = prepare_model(MultipleNegativesRankingLoss(model), move_to_device=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    shard = config["triplets"][rank::world]
    bs = config["batch_size"]
    model.train()
    losses = []
    for step in range(config["steps"]):
        start = (step * bs) % len(shard)
        batch = (shard[start:] + shard[:start])[:bs]
        features = [model.tokenize([t[i] for t in batch]) for i in range(3)]
        loss = loss_fn(features, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    metrics = {"loss_first": losses[0], "loss_last": sum(losses[-3:]) / len(losses[-3:]), "steps": len(losses)}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save(tmp)
            train.report(metrics, checkpoint=train.Checkpoint.from_directory(tmp))
    else:
        train.report(metrics)


def finetune_embedder(triplets: list[tuple[str, str, str]], embedder: str, out_dir, steps: int = 20,
                      batch_size: int = 16, lr: float = 2e-5, num_workers: int = 1, cpus_per_worker: float = 0.9,
                      seed: int = 0) -> tuple[Path, dict]:
    """Train on Ray; returns (<out_dir>/model, metrics). Ray must be initialised."""
    import math

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if len(triplets) < num_workers:
        raise ValueError(f"finetune_embedder: {len(triplets)} triplets for {num_workers} workers")
    out = Path(out_dir).resolve()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"triplets": triplets, "embedder": embedder, "steps": steps, "batch_size": batch_size,
                           "lr": lr, "seed": seed, "threads": max(1, math.floor(cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name="tune_embedder", storage_path=str(out / "ray_train")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune_embedder: training finished without a checkpoint ({result.error})")
    target = out / "model"
    if target.exists():
        shutil.rmtree(target)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, target)
    return target, dict(result.metrics or {})


# A spread of STEM fields: the held-out same-subject precision needs subjects that differ.
DEFAULT_SUBJECTS = ("college_physics", "high_school_biology", "computer_security", "high_school_chemistry",
                    "astronomy", "elementary_mathematics")


def tune_and_evaluate(data_root: Path, out_dir, embedder: str = "all-MiniLM-L6-v2", subjects=DEFAULT_SUBJECTS,
                      steps: int = 30, n_triplets: int = 480, batch_size: int = 16, qasc_questions: int = 300,
                      held_out: float = 0.3, k: int = 5, seed: int = 0) -> dict:
    """Fine-tune on MMLU triplets (Ray Train) and measure retrieval before and after, on held-out data.

    MMLU test questions of `subjects` are split per subject (`held_out` share kept out of training);
    same-subject precision@k ranks the held-out questions against the training ones. QASC dev (never trained
    on) gives recall@k of its gold facts. Ray must be initialised."""
    import time

    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_source
    from stemqa.models import load_embedder
    from stemqa.rag.evaluate import evaluate_embedder, load_qasc_gold

    records, _ = load_source(McqSource(path="mcq/mmlu/test", format="mmlu_csv", subjects=list(subjects)), data_root)
    train, held = split_by_subject(records, held_out, seed)
    gold = load_qasc_gold(Path(data_root) / "mcq" / "qasc" / "dev.jsonl", limit=qasc_questions)
    before = evaluate_embedder(load_embedder(embedder), gold, held, train, k)
    t = time.perf_counter()
    model_dir, metrics = finetune_embedder(make_triplets(train, n_triplets, seed), embedder, out_dir, steps=steps,
                                           batch_size=batch_size, seed=seed)
    train_s = time.perf_counter() - t
    after = evaluate_embedder(load_embedder(str(model_dir)), gold, held, train, k)
    return {"embedder": embedder, "model_dir": str(model_dir), "subjects": list(subjects), "mmlu_train": len(train),
            "mmlu_held_out": len(held), "qasc_questions": len(gold), "triplets": n_triplets, "steps": steps,
            "batch_size": batch_size, "before": before, "after": after, "train_wall_s": round(train_s, 1),
            "train": {key: metrics[key] for key in ("loss_first", "loss_last") if key in metrics}}
