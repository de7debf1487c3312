"""Batch text embedding as a Ray Data job, and embeddings on disk.

`embed_texts(texts, cfg)` runs `from_items -> map_batches(_EmbedBatch)` on an actor pool: each actor loads the
sentence-transformers model once (through `stemqa.models.load_embedder`) and encodes whole batches. Vectors are
L2-normalised float32, returned in input order (the job embeds them shortest first, to pad less).

Sizing (measured on 2 CPUs, see shared/notes/ray-on-small-machines.md): `from_items` has no read stage, and
actors default to 0.5 CPU, so the job cannot deadlock on a 2-CPU machine; each actor sets torch's thread count
to the CPUs it holds, so fractional actors do not oversubscribe the cores. On a cluster, raise `num_actors`
(and `gpus_per_actor` on GPU nodes).

The caller initialises Ray (`stemqa.ray_utils.init_ray`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from stemqa.config.schema import EmbedConfig


class _EmbedBatch:
    """Ray Data callable class: one embedder per actor, reused for every batch it is given."""

    def __init__(self, embedder: str, cpus: float, use_gpu: bool):
        import torch

        from stemqa.models import load_embedder

        # Match torch's threads to the CPUs this actor holds (0.5 CPU -> 1 thread), else actors fight for cores.
        torch.set_num_threads(max(1, math.floor(cpus)))
        self.model = load_embedder(embedder, device="cuda" if use_gpu else "cpu")

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        vectors = self.model.encode(texts, batch_size=len(texts), normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return {"idx": batch["idx"], "embedding": vectors.astype(np.float32)}


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed_texts: expected a list of texts, got one string")
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts: no texts to embed")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"embed_texts: text {i} is {type(t).__name__}, not str")
        if not t.strip():
            raise ValueError(f"embed_texts: text {i} is empty")
    return texts


def embedding_dataset(texts: list[str], cfg: EmbedConfig):
    """The lazy Ray Dataset of {idx, embedding} rows (embed_texts runs it; benchmarks time its batches)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not ray.is_initialized():
        raise RuntimeError("embed_texts: Ray is not initialised (call stemqa.ray_utils.init_ray first)")
    DataContext.get_current().execution_options.preserve_order = True
    # Rows go in by length, so each batch pads to a similar length: sentence-transformers sorts only within the
    # batch it is given, and unsorted batches of real MCQ questions padded to 2.1x their real tokens (3k texts of
    # benchmarks/bench_embed.py, batches of 64; 1.04x when sorted). `idx` carries the input order back.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ds = ray.data.from_items([{"idx": i, "text": texts[i]} for i in order])
    return ds.map_batches(
        _EmbedBatch,
        fn_constructor_kwargs={"embedder": cfg.embedder, "cpus": cfg.cpus_per_actor,
                               "use_gpu": cfg.gpus_per_actor > 0},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )


def embed_texts(texts: Sequence[str], cfg: EmbedConfig, progress=None) -> np.ndarray:
    """Embed `texts` with Ray Data; float32 [n, dim], L2-normalised, row i is texts[i]. `progress(done, total)`
    is called as batches come back (stemqa.progress)."""
    texts = _check_texts(texts)
    ds = embedding_dataset(texts, cfg)
    idx_parts, vec_parts, done = [], [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx_parts.append(batch["idx"])
        vec_parts.append(np.asarray(batch["embedding"], dtype=np.float32))
        done += len(batch["idx"])
        if progress is not None:
            progress(done, len(texts))
    idx = np.concatenate(idx_parts)
    vectors = np.concatenate(vec_parts)
    # Rows come back in length order (see embedding_dataset); the carried index puts them in input order and
    # checks that every text came back exactly once.
    order = np.argsort(idx, kind="stable")
    idx, vectors = idx[order], vectors[order]
    if not np.array_equal(idx, np.arange(len(texts))):
        raise RuntimeError(f"embed_texts: got {len(idx)} embeddings back for {len(texts)} texts")
    return np.ascontiguousarray(vectors)


def embed_local(texts: Sequence[str], model) -> np.ndarray:
    """Embed in this process with an already-loaded SentenceTransformer (query time: no Ray, no actor start)."""
    texts = _check_texts(texts)
    vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def save_embeddings(out_dir, ids: Sequence[str], vectors: np.ndarray, embedder: str) -> Path:
    """Write `embeddings.npy` (float32 [n, dim]) and `ids.json` ({embedder, dim, ids}) to `out_dir`."""
    out = Path(out_dir)
    ids = [str(i) for i in ids]
    if len(ids) != len(vectors):
        raise ValueError(f"save_embeddings: {len(ids)} ids for {len(vectors)} vectors")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", np.asarray(vectors, dtype=np.float32))
    (out / "ids.json").write_text(json.dumps({"embedder": embedder, "dim": int(vectors.shape[1]), "ids": ids}))
    return out


def load_embeddings(out_dir) -> tuple[list[str], np.ndarray, str]:
    """Read what `save_embeddings` wrote: (ids, vectors, embedder name)."""
    out = Path(out_dir)
    meta = json.loads((out / "ids.json").read_text())
    vectors = np.load(out / "embeddings.npy")
    if len(meta["ids"]) != len(vectors) or vectors.shape[1] != meta["dim"]:
        raise ValueError(f"{out}: embeddings.npy {vectors.shape} does not match ids.json "
                         f"({len(meta['ids'])} ids, dim {meta['dim']})")
    return meta["ids"], vectors, meta["embedder"]
