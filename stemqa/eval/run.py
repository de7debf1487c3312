"""Evaluate a model on MCQ sets: metrics.json + predictions.jsonl per set, in-process or as a Ray task.

    evaluate(model, records, out_dir, ...)            one set -> out_dir/{metrics.json,predictions.jsonl}
    evaluate_sets(model, cfg, data_root, out_dir)     every cfg.eval.sets entry -> out_dir/<set>/...
    evaluate_sets_remote(...) / evaluate_remote(...)  the same as a Ray task (num_cpus=1); ray.get -> metrics

Scoring itself is `MCQScorer` (one forward pass per question, lm-eval compatible); this module loads the
model once, picks k-shot examples and retrieved passages, times the run and writes the files.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from stemqa.data.mcq import MCQ, load_source, load_sources
from stemqa.eval.modes import ModeParams, as_params, params_from_config
from stemqa.eval.scorer import MCQScorer, Prediction, accuracy

# k-shot examples: one list for every question, or a list per subject (MMLU: the subject's dev split)
FewShot = Union[Sequence[MCQ], Mapping[str, Sequence[MCQ]]]

# Questions scored per progress-bar step; big enough that length-sorted batches stay well packed.
CHUNK = 128


def load_scorer(model: str, batch_size: int = 8, dtype: str = "auto") -> MCQScorer:
    from stemqa.models import load_causal_lm, load_tokenizer

    return MCQScorer(load_causal_lm(model, dtype=dtype), load_tokenizer(model), batch_size=batch_size)


def _fewshot_for(q: MCQ, fewshot: FewShot) -> tuple[MCQ, ...]:
    shots = fewshot.get(q.subject, ()) if isinstance(fewshot, Mapping) else fewshot
    # never show a question its own answer (lm-eval drops the eval doc from its fewshot sample too)
    return tuple(s for s in shots if s.id != q.id)


def score_records(scorer: MCQScorer, records: Sequence[MCQ], scoring: Union[str, ModeParams] = "letter",
                  fewshot: FewShot = (),
                  header: bool = True, passages: Optional[Sequence[Sequence[str]]] = None,
                  progress: bool = True, desc: str = "eval", on_progress=None) -> list[Prediction]:
    """Score records in chunks (for the progress bar); questions sharing k-shot examples are scored together.
    `on_progress(done, total)` is called after each chunk (stemqa.progress)."""
    from tqdm.auto import tqdm

    if passages is not None and len(passages) != len(records):
        raise ValueError(f"passages: {len(passages)} lists for {len(records)} records")
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(records):
        groups.setdefault(tuple(s.id for s in _fewshot_for(q, fewshot)), []).append(i)
    preds: list[Optional[Prediction]] = [None] * len(records)
    done = 0  # the bar counts nothing when disabled
    with tqdm(total=len(records), desc=desc, unit="q", disable=not progress or len(records) < CHUNK,
              mininterval=2.0) as bar:
        for idx in groups.values():
            shots = _fewshot_for(records[idx[0]], fewshot)
            for start in range(0, len(idx), CHUNK):
                part = idx[start:start + CHUNK]
                out = scorer.score([records[i] for i in part], scoring=scoring, fewshot=shots, header=header,
                                   passages=[passages[i] for i in part] if passages is not None else None)
                for i, p in zip(part, out):
                    preds[i] = p
                bar.update(len(part))
                done += len(part)
                if on_progress is not None:
                    on_progress(done, len(records))
    return preds  # type: ignore[return-value]


def write_results(out_dir: Path, metrics: dict, preds: Sequence[Prediction]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in preds:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def evaluate(model: str, records: Sequence[MCQ], out_dir: Path, scoring: Union[str, ModeParams] = "letter",
             batch_size: int = 8,
             fewshot: FewShot = (), header: bool = True, passages: Optional[Sequence[Sequence[str]]] = None,
             data_desc: str = "", *, dtype: str = "auto", scorer: Optional[MCQScorer] = None,
             progress: bool = True, on_progress=None) -> dict:
    """Score `records` with `model`, write out_dir/metrics.json and predictions.jsonl, return the metrics.

    `fewshot` is one list of k-shot examples for every question or a {subject: examples} mapping; `passages[i]`
    are retrieved texts put before question i. Pass a ready `scorer` to reuse a loaded model across sets.
    """
    if not records:
        raise ValueError(f"no records to evaluate ({data_desc or 'empty set'})")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    loaded_here = scorer is None
    scorer = scorer or load_scorer(model, batch_size, dtype)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = score_records(scorer, records, scoring, fewshot, header, passages, progress,
                          desc=f"eval {data_desc}".strip(), on_progress=on_progress)
    score_s = time.perf_counter() - t1
    k = max((len(_fewshot_for(q, fewshot)) for q in records), default=0)
    metrics = {
        **accuracy(preds),
        "model": str(model), "data": data_desc, "scoring": as_params(scoring).label(), "num_fewshot": k, "subject_header": header,
        "rag": passages is not None, "batch_size": scorer.batch_size,
        "time_s": round(score_s, 3), "load_time_s": round(load_s, 3) if loaded_here else None,
        "questions_per_s": round(len(records) / score_s, 3) if score_s > 0 else None,
    }
    flagged = [p for p in preds if p.unsure is not None]
    if flagged:  # fitted mode parameters with an "unsure" threshold: how often it answers, and how well
        sure = [p for p in flagged if not p.unsure]
        metrics["unsure_share"] = round(1 - len(sure) / len(flagged), 6)
        metrics["accuracy_when_sure"] = sum(p.pred == p.gold for p in sure) / len(sure) if sure else None
    write_results(out_dir, metrics, preds)
    return metrics


# --- sets from the config -------------------------------------------------------------------------------------
def fewshot_pool(cfg, data_root: Path) -> dict[str, list[MCQ]]:
    """{subject: its first k examples} from cfg.eval.fewshot_source, as lm-eval's `first_n` sampler."""
    if cfg.eval.fewshot_source is None:
        raise ValueError("eval.num_fewshot > 0 needs eval.fewshot_source (e.g. the MMLU dev split)")
    pool, _ = load_source(cfg.eval.fewshot_source, data_root, cfg.data.skip_invalid)
    if not pool:
        raise ValueError(f"eval.fewshot_source {cfg.eval.fewshot_source.path}: no examples loaded")
    by_subject: dict[str, list[MCQ]] = {}
    for q in pool:
        by_subject.setdefault(q.subject, []).append(q)
    return {s: qs[:cfg.eval.num_fewshot] for s, qs in by_subject.items()}


def fewshot_for_records(records: Sequence[MCQ], shots: Mapping[str, Sequence[MCQ]]) -> dict[str, list[MCQ]]:
    """k-shot examples per subject of `records`; a subject the pool lacks gets the pool's first k (mixed)."""
    k = max(len(v) for v in shots.values())
    fallback = [q for qs in shots.values() for q in qs][:k]
    return {s: list(shots.get(s) or fallback) for s in {q.subject for q in records}}


def retrieve_passages(retriever, records: Sequence[MCQ], k: int, token_budget: Optional[int] = None,
                      tokenizer=None) -> list[list[str]]:
    """Passage texts per question from `retriever.search(queries, k)`, cut to `token_budget` model tokens by
    `passages_within_budget`, the function the Serve app cuts with: served and evaluated prompts are equal."""
    from stemqa.rag import passages_within_budget

    hits = retriever.search([q.question for q in records], k)
    if not (token_budget and tokenizer is not None):
        return [[p.text.strip() for p in found] for found in hits]
    return [[p.text.strip() for p in passages_within_budget(found, tokenizer, token_budget)] for found in hits]


def evaluate_sets(model: str, cfg, data_root: Path, out_dir: Path, retriever=None, progress: bool = True,
                  scorer: Optional[MCQScorer] = None, on_progress=None) -> dict:
    """Evaluate every cfg.eval.sets entry into out_dir/<set>/; returns {set name: metrics}."""
    ev = cfg.eval
    if not ev.sets:
        raise ValueError("eval.sets is empty: nothing to evaluate")
    if ev.use_rag and retriever is None:
        raise ValueError("eval.use_rag is on but no retriever was given (build the RAG index first)")
    scorer = scorer or load_scorer(model, ev.batch_size, cfg.model.dtype)
    params = params_from_config(ev)
    shots = fewshot_pool(cfg, data_root) if ev.num_fewshot > 0 else None
    results = {}
    for s in ev.sets:
        records, _ = load_sources(s.sources, data_root, cfg.data.skip_invalid)
        fewshot: FewShot = ()
        if shots is not None:
            fewshot = fewshot_for_records(records, shots)
        passages = (retrieve_passages(retriever, records, cfg.rag.top_k, cfg.rag.token_budget, scorer.tok)
                    if ev.use_rag else None)
        desc = s.name + " (" + ", ".join(f"{src.name or Path(src.path).stem}" for src in s.sources) + ")"
        results[s.name] = evaluate(model, records, Path(out_dir) / s.name, params, ev.batch_size,
                                   fewshot, ev.subject_header, passages, desc, scorer=scorer, progress=progress,
                                   on_progress=on_progress)
    (Path(out_dir) / "summary.json").write_text(json.dumps(results, indent=2))
    return results


# --- Ray ------------------------------------------------------------------------------------------------------
def _set_threads(num_cpus: float) -> None:
    import torch

    # a task holding n CPUs uses n threads: more oversubscribes a shared 2-CPU machine (ray-on-small-machines)
    torch.set_num_threads(max(1, int(num_cpus)))


def _evaluate_sets_task(model, cfg, data_root, out_dir, retriever_factory, num_cpus, on_progress=None):
    _set_threads(num_cpus)
    retriever = retriever_factory() if retriever_factory is not None else None
    return evaluate_sets(model, cfg, Path(data_root), Path(out_dir), retriever, progress=False, on_progress=on_progress)


def _evaluate_task(model, records, out_dir, kwargs, num_cpus):
    _set_threads(num_cpus)
    return evaluate(model, records, Path(out_dir), progress=False, **kwargs)


def evaluate_sets_remote(model: str, cfg, data_root: Path, out_dir: Path,
                         retriever_factory: Optional[Callable[[], Any]] = None, num_cpus: float = 1,
                         on_progress=None):
    """`evaluate_sets` as a Ray task; returns an ObjectRef of {set: metrics}. out_dir must be visible to the
    node that runs it (one machine, or shared storage). The retriever is built inside the task by
    `retriever_factory` (a picklable zero-argument callable), since a FAISS index does not travel well."""
    import ray

    task = ray.remote(num_cpus=num_cpus)(_evaluate_sets_task)
    return task.remote(model, cfg, str(data_root), str(out_dir), retriever_factory, num_cpus, on_progress)


def evaluate_remote(model: str, records: Sequence[MCQ], out_dir: Path, num_cpus: float = 1, **kwargs):
    """`evaluate` as a Ray task; returns an ObjectRef of the metrics dict."""
    import ray

    task = ray.remote(num_cpus=num_cpus)(_evaluate_task)
    return task.remote(model, list(records), str(out_dir), kwargs, num_cpus)
