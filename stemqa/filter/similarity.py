"""Score each training sample by its max cosine similarity to each target set; keep the closest.

The seed's recipe (appendix A.3): embed every sample (question + options) and every target sample with the
same sentence embedder, score = max inner product of normalised vectors (= max cosine) over the target set,
one score per target and their mean; keep by threshold or top-N. All texts are embedded in one Ray Data job
so the actor start-up is paid once. FAISS does the max search: exact IndexFlatIP by default, HNSW when a
target set is too large for exact search to be cheap.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from stemqa.config.schema import FilterConfig
from stemqa.data.mcq import MCQ, load_sources, write_records
from stemqa.embed import embed_texts, save_embeddings
from stemqa.filter.plot import score_histogram


class FilterError(ValueError):
    """Bad filter input, or a filter that would keep nothing."""


def mcq_text(q: MCQ) -> str:
    """What is embedded for a sample: the question and its options, one per line."""
    return "\n".join([q.question.strip(), *(c.strip() for c in q.choices)])


def load_targets(cfg: FilterConfig, data_root: Path, skip_invalid: bool = False) -> dict[str, list[MCQ]]:
    """The configured target sets, by name, loaded from `data_root`."""
    targets: dict[str, list[MCQ]] = {}
    for t in cfg.targets:
        if t.name in targets:
            raise FilterError(f"filter.targets: the name {t.name!r} is used twice")
        targets[t.name], _ = load_sources(t.sources, data_root, skip_invalid)
    return targets


def max_similarity(samples: np.ndarray, target: np.ndarray, index: str = "flat", hnsw_m: int = 32,
                   hnsw_ef_search: int = 128) -> np.ndarray:
    """For each sample row, the max inner product with any target row (vectors normalised -> max cosine)."""
    import faiss

    samples = np.ascontiguousarray(samples, dtype=np.float32)
    target = np.ascontiguousarray(target, dtype=np.float32)
    if samples.shape[1] != target.shape[1]:
        raise FilterError(f"embedding dims differ: samples {samples.shape[1]}, target {target.shape[1]}")
    dim = target.shape[1]
    if index == "flat":
        ix = faiss.IndexFlatIP(dim)
    elif index == "hnsw":
        ix = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efSearch = hnsw_ef_search
    else:
        raise FilterError(f"filter.index: unknown index {index!r} (flat, hnsw)")
    ix.add(target)
    sims, _ = ix.search(samples, 1)
    return sims[:, 0].copy()


def keep_mask(mean_scores: np.ndarray, threshold: Optional[float], top_n: Optional[int]) -> np.ndarray:
    """Boolean mask of kept samples: the top_n best when top_n is set, else mean score >= threshold."""
    scores = np.asarray(mean_scores)
    mask = np.zeros(len(scores), dtype=bool)
    if top_n is not None:
        order = np.argsort(-scores, kind="stable")  # ties keep input order
        mask[order[:top_n]] = True
    elif threshold is not None:
        mask = scores >= threshold
    else:
        raise FilterError("filter: set filter.threshold or filter.top_n")
    return mask


def _cutoff(mean: np.ndarray, mask: np.ndarray, cfg: FilterConfig) -> tuple[Optional[float], str]:
    if cfg.top_n is not None:
        return (float(mean[mask].min()) if mask.any() else None), f"top {cfg.top_n} cut-off"
    return cfg.threshold, f"threshold {cfg.threshold}"


def _write_scores(path: Path, records: list[MCQ], per_target: dict[str, np.ndarray], mean, mask) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            row = {"id": r.id, "source": r.source,
                   "scores": {name: None if s is None else round(float(s[i]), 6) for name, s in per_target.items()},
                   "mean": None if mean is None else round(float(mean[i]), 6), "kept": bool(mask[i])}
            f.write(json.dumps(row) + "\n")


def _counts(records: list[MCQ], mask: np.ndarray) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for r, k in zip(records, mask):
        c = counts.setdefault(r.source, {"kept": 0, "dropped": 0})
        c["kept" if k else "dropped"] += 1
    return counts


def _check_inputs(records, targets, cfg: FilterConfig) -> None:
    if not records:
        raise FilterError("filter: no training samples to filter")
    if not cfg.enabled:
        return
    if not targets:
        raise FilterError("filter: no target sets (filter.targets is empty); disable the filter or add one")
    for name, items in targets.items():
        if not items:
            raise FilterError(f"filter: target set {name!r} has no samples")
    if cfg.top_n is None and cfg.threshold is None:
        raise FilterError("filter: set filter.threshold or filter.top_n")


def run_filter(records: list[MCQ], targets: dict[str, list[MCQ]], cfg: FilterConfig, out_dir: Path,
               progress=None) -> dict:
    """Score `records` against `targets`, write kept.jsonl, scores.jsonl and scores_hist.png into `out_dir`,
    and the embeddings with their ids in `out_dir/embeddings` (ids `sample:<id>` and `<target>:<id>`).

    Raises FilterError on bad input, and when nothing would be kept (after writing the scores and histogram,
    so the cause can be seen). Ray must be initialised.
    """
    records = list(records)
    _check_inputs(records, targets, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept_path, scores_path, hist_path = out / "kept.jsonl", out / "scores.jsonl", out / "scores_hist.png"

    if not cfg.enabled:  # pass-through: every sample kept, no scores
        mask = np.ones(len(records), dtype=bool)
        _write_scores(scores_path, records, {}, None, mask)
        write_records(records, kept_path)
        return {"kept_path": str(kept_path), "scores_path": str(scores_path), "histogram": None, "embeddings": None,
                "counts": _counts(records, mask), "kept": len(records), "total": len(records)}

    names = list(targets)
    texts = [mcq_text(r) for r in records]
    ids = [f"sample:{r.id}" for r in records]
    spans = {}
    for name in names:
        spans[name] = (len(texts), len(texts) + len(targets[name]))
        texts += [mcq_text(q) for q in targets[name]]
        ids += [f"{name}:{q.id}" for q in targets[name]]
    vectors = embed_texts(texts, cfg.embed, progress)  # one Ray Data job for samples and all targets
    emb_dir = save_embeddings(out / "embeddings", ids, vectors, cfg.embed.embedder)  # reusable without re-embedding
    samples = vectors[: len(records)]
    per_target = {name: max_similarity(samples, vectors[a:b], cfg.index, cfg.hnsw_m, cfg.hnsw_ef_search)
                  for name, (a, b) in spans.items()}
    mean = np.mean(np.stack([per_target[n] for n in names]), axis=0)
    mask = keep_mask(mean, cfg.threshold, cfg.top_n)

    _write_scores(scores_path, records, per_target, mean, mask)
    cutoff, label = _cutoff(mean, mask, cfg)
    plotted = dict(per_target, mean=mean) if len(names) > 1 else per_target
    score_histogram(plotted, cutoff, label, hist_path)
    if not mask.any():
        raise FilterError(
            f"filter kept none of {len(records)} samples: threshold {cfg.threshold} is above the best mean "
            f"score {float(mean.max()):.3f} (scores in {scores_path}, histogram {hist_path})")
    write_records([r for r, k in zip(records, mask) if k], kept_path)
    return {"kept_path": str(kept_path), "scores_path": str(scores_path), "histogram": str(hist_path),
            "embeddings": str(emb_dir), "counts": _counts(records, mask), "kept": int(mask.sum()), "total": len(records)}
