"""Retrieval quality: recall@k of QASC's gold facts, and same-subject precision@k on MMLU questions.

Used to compare embedders (before/after fine-tuning) on held-out questions. Both run in process: the sets
are small (hundreds of queries) and a Ray job would cost more in start-up than the encoding.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from stemqa.data.mcq import MCQ
from stemqa.embed import embed_local


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load_qasc_gold(path, limit: Optional[int] = None) -> list[tuple[str, set[str]]]:
    """(question stem, {fact1, fact2}) for each QASC row."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            try:
                out.append((row["question"]["stem"], {_norm(row["fact1"]), _norm(row["fact2"])}))
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: a QASC row needs question.stem, fact1 and fact2") from None
    return out


def fact_recall_at_k(retriever, gold: list[tuple[str, set[str]]], k: int) -> dict:
    """recall@k = share of gold facts found in the top k (mean over questions); hit@k = any gold fact found."""
    results = retriever.search([q for q, _ in gold], k)
    recall, hit = [], []
    for (_, facts), passages in zip(gold, results):
        found = facts & {_norm(p.text) for p in passages}
        recall.append(len(found) / len(facts))
        hit.append(bool(found))
    return {f"recall@{k}": float(np.mean(recall)), f"hit@{k}": float(np.mean(hit)), "questions": len(gold)}


def same_subject_precision_at_k(model, queries: list[MCQ], pool: list[MCQ], k: int) -> float:
    """Mean share of the k nearest pool questions (by embedding) that have the query's subject."""
    import faiss

    q_vecs = embed_local([q.question for q in queries], model)
    p_vecs = embed_local([p.question for p in pool], model)
    index = faiss.IndexFlatIP(p_vecs.shape[1])
    index.add(p_vecs)
    _, ids = index.search(q_vecs, k)
    subjects = np.array([p.subject for p in pool])
    return float(np.mean([(subjects[row] == q.subject).mean() for q, row in zip(queries, ids)]))


def evaluate_embedder(model, qasc_gold, mmlu_queries: list[MCQ], mmlu_pool: list[MCQ], k: int = 5) -> dict:
    """Both metrics for one embedder: QASC fact recall@k over an in-memory flat index of the facts, MMLU P@k."""
    import faiss

    facts = sorted({f for _, fs in qasc_gold for f in fs})
    vecs = embed_local(facts, model)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)

    class _FactRetriever:  # the Retriever interface over this throw-away index
        @staticmethod
        def search(queries, kk):
            from stemqa.rag.retriever import Passage

            scores, ids = index.search(embed_local(queries, model), kk)
            return [[Passage(facts[i], "qasc", float(s)) for s, i in zip(ss, ii)] for ss, ii in zip(scores, ids)]

    out = fact_recall_at_k(_FactRetriever, qasc_gold, k)
    out[f"mmlu_same_subject_p@{k}"] = same_subject_precision_at_k(model, mmlu_queries, mmlu_pool, k)
    return out
