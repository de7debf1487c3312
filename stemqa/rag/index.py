"""Build (once) and save the FAISS index of the RAG corpus.

    <out_dir>/index.faiss     the FAISS index (vectors are L2-normalised embeddings of the chunks)
    <out_dir>/chunks.jsonl    one chunk per index row: {id, text, source, doc_id, n_tokens}
    <out_dir>/manifest.json   embedder name and dim, normalisation, metric, index settings, corpus hash, counts

The manifest is written last (atomically), so a directory with a manifest is a complete index. A second
`build_index` with the same corpus, embedder and index settings reuses the directory instead of rebuilding.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from stemqa.config.schema import RagConfig
from stemqa.embed import embed_texts
from stemqa.rag.corpus import build_chunks, corpus_hash, load_chunk_tokenizer, write_chunks

FORMAT = "stemqa-rag-index/1"


def _index_settings(cfg: RagConfig) -> dict:
    return {"type": cfg.index, "ivf_nlist": cfg.ivf_nlist, "ivf_nprobe": cfg.ivf_nprobe,
            "hnsw_m": cfg.hnsw_m, "hnsw_ef_search": cfg.hnsw_ef_search}


def _build_settings(cfg: RagConfig) -> dict:
    """Everything besides the chunks that changes the built index; a mismatch means rebuild."""
    return {"embedder": cfg.embed.embedder, "metric": cfg.metric, "near_dup_threshold": cfg.near_dup_threshold,
            "index": _index_settings(cfg)}


def near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of rows whose cosine similarity to an earlier kept row is >= threshold (rows normalised)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    lims, _, ids = index.range_search(vectors, threshold)  # all pairs at or above the threshold, exact
    dropped = np.zeros(len(vectors), dtype=bool)
    for i in range(len(vectors)):  # greedy in corpus order: the first of a group stays
        if dropped[i]:
            continue
        neighbours = ids[lims[i]: lims[i + 1]]
        dropped[neighbours[neighbours > i]] = True
    return dropped


def make_faiss_index(vectors: np.ndarray, kind: str, metric: str, nlist=None, hnsw_m: int = 32):
    """A FAISS index holding `vectors`: flat (exact), ivf (IVFFlat, trained here) or hnsw."""
    import faiss

    dim = vectors.shape[1]
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    elif kind == "ivf":
        # FAISS wants >= 39 training points per cell; fewer cells for a small corpus than 4*sqrt(n).
        nlist = nlist or max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // 39))
        quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
        index.train(vectors)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss_metric)
    else:
        raise ValueError(f"rag.index: unknown index type {kind!r} (flat, ivf, hnsw)")
    index.add(vectors)
    return index


def read_manifest(index_dir: Path) -> dict | None:
    path = Path(index_dir) / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _reusable(out: Path, manifest: dict | None, chash: str, settings: dict) -> bool:
    return (manifest is not None and manifest.get("format") == FORMAT and manifest.get("corpus_hash") == chash
            and manifest.get("build_settings") == settings
            and (out / "index.faiss").exists() and (out / "chunks.jsonl").exists())


def build_index(rag_cfg: RagConfig, data_root: Path, out_dir: Path, force: bool = False, progress=None) -> Path:
    """Build the corpus index into `out_dir` (or reuse the one there); returns `out_dir`. Ray must be up.
    `progress(done, total)` follows the embedding job."""
    import faiss

    out = Path(out_dir)
    started = time.time()
    tokenizer = load_chunk_tokenizer(rag_cfg.embed.embedder)
    chunks, counts = build_chunks(rag_cfg, Path(data_root), tokenizer)
    chash, settings = corpus_hash(chunks), _build_settings(rag_cfg)
    try:
        existing = read_manifest(out)
    except json.JSONDecodeError:
        existing = None  # a broken manifest is rebuilt over
    if not force and _reusable(out, existing, chash, settings):
        return out

    vectors = embed_texts([c.text for c in chunks], rag_cfg.embed, progress)
    counts["near_duplicates"] = 0
    if rag_cfg.near_dup_threshold is not None:
        dropped = near_duplicates(vectors, rag_cfg.near_dup_threshold)
        counts["near_duplicates"] = int(dropped.sum())
        chunks = [c for c, d in zip(chunks, dropped) if not d]
        vectors = np.ascontiguousarray(vectors[~dropped])
    counts["chunks"], counts["tokens"] = len(chunks), sum(c.n_tokens for c in chunks)
    counts["by_source"] = {}
    for c in chunks:
        counts["by_source"][c.source] = counts["by_source"].get(c.source, 0) + 1

    index = make_faiss_index(vectors, rag_cfg.index, rag_cfg.metric, rag_cfg.ivf_nlist, rag_cfg.hnsw_m)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # incomplete until the new manifest lands
    faiss.write_index(index, str(out / "index.faiss"))
    write_chunks(chunks, out / "chunks.jsonl")
    manifest = {
        "format": FORMAT, "embedder": rag_cfg.embed.embedder, "dim": int(vectors.shape[1]), "normalized": True,
        "metric": rag_cfg.metric, "index": _index_settings(rag_cfg), "corpus_hash": chash,
        "build_settings": settings, "counts": counts,
        "chunking": {"chunk_tokens": rag_cfg.chunk_tokens, "chunk_overlap": rag_cfg.chunk_overlap,
                     "max_chunks": rag_cfg.max_chunks, "max_tokens": rag_cfg.max_tokens},
        "sources": [s.model_dump() for s in rag_cfg.corpus],
        "built_at": time.time(), "build_seconds": round(time.time() - started, 2),
    }
    tmp = out / f".manifest.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return out
