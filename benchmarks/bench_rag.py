"""RAG evidence: MCQA accuracy with and without retrieval; the embedder before and after fine-tuning.

    .venv/bin/python benchmarks/bench_rag.py accuracy [--qasc 100] [--mmlu 100] [--scoring letter cloze]
    .venv/bin/python benchmarks/bench_rag.py embedder [--qasc 300] [--steps 30]
    .venv/bin/python benchmarks/bench_rag.py            # both

accuracy: the same model (smollm2-135m-instruct) scores the same questions twice, without passages and with the
top-k passages of the demo index (`stemqa.eval.run.retrieve_passages`: rag.top_k, rag.token_budget), for QASC
dev (its fact1/fact2 are in the demo corpus) and an MMLU STEM slice (the physics and chemistry subjects the
demo corpus's OpenStax books cover), letter and cloze scoring. "fixed"/"broken" count the questions that
retrieval turns right/wrong, so a difference can be told from noise. The index is the demo preset's
(`stemqa rag build --config demo`), built once into benchmarks/out/rag/demo_index and reused.

embedder: all-MiniLM-L6-v2 fine-tuned on MMLU subject triplets (stemqa.rag.tune_embedder, a Ray Train job on a
private local Ray); before/after on held-out data: recall@5 / hit@5 of the gold facts of QASC questions (over
an index of those questions' facts) and same-subject precision@5 of held-out MMLU questions.

Results go to benchmarks/out/rag/*.json and the "RAG" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
OUT = ROOT / "benchmarks" / "out" / "rag"
SECTION = "## RAG: retrieval in the prompt, and the tuned embedder"
# MMLU STEM subjects the demo corpus covers (OpenStax University Physics and Chemistry)
MMLU_SUBJECTS = ["conceptual_physics", "high_school_physics", "college_physics", "high_school_chemistry",
                 "college_chemistry"]


def load_avg() -> float:
    return round(os.getloadavg()[0], 1)


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


# --- accuracy with and without retrieval ------------------------------------------------------------------
def qasc_records(root: Path, n: int):
    from stemqa.data.mcq import load_file

    return load_file(root / "mcq" / "qasc" / "dev.jsonl", "arc_jsonl", source="qasc_dev", subject="science",
                     limit=n)[0]


def mmlu_records(root: Path, n: int):
    from stemqa.data.mcq import load_file

    per = -(-n // len(MMLU_SUBJECTS))
    recs = []
    for s in MMLU_SUBJECTS:
        recs += load_file(root / "mcq" / "mmlu" / "test" / f"{s}_test.csv", "mmlu_csv", limit=per)[0]
    return recs[:n]


def demo_index(index_dir: Path):
    """The demo preset's RAG index (built with Ray Data on a private local Ray unless already there)."""
    from stemqa.config.load import load_config
    from stemqa.data.paths import data_root
    from stemqa.rag import build_index

    cfg = load_config("demo")
    if not (index_dir / "manifest.json").exists():
        from stemqa.ray_utils import init_ray

        init_ray("local", num_cpus=os.cpu_count())
    return build_index(cfg.rag, data_root(), index_dir), cfg  # reuses an up-to-date index without Ray


def qasc_gold_hits(root: Path, records, passages) -> float:
    """Share of QASC questions with fact1 or fact2 among their retrieved passages (whole or cut by the budget)."""
    rows = {}
    with open(root / "mcq" / "qasc" / "dev.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[r["id"]] = {" ".join(r[k].lower().split()) for k in ("fact1", "fact2")}
    norm = lambda t: " ".join(t.lower().split())
    hits = [any(any(norm(p) in g or g.startswith(norm(p)) for g in rows[q.id.split("/")[-1]]) for p in ps)
            for q, ps in zip(records, passages) if q.id.split("/")[-1] in rows]
    return sum(hits) / len(hits) if hits else float("nan")


def run_accuracy(args) -> dict:
    import torch

    from stemqa.data.paths import data_root
    from stemqa.eval.run import load_scorer, retrieve_passages, score_records
    from stemqa.eval.scorer import accuracy
    from stemqa.rag import Retriever

    root = data_root()
    index_dir, cfg = demo_index(Path(args.index))
    retriever = Retriever.load(index_dir)
    scorer = load_scorer(args.model, batch_size=args.batch_size)
    sets = {"qasc_dev": qasc_records(root, args.qasc), "mmlu_stem": mmlu_records(root, args.mmlu)}
    out_path = OUT / "accuracy.json"
    result = {"model": args.model, "index": str(index_dir), "chunks": len(retriever), "top_k": cfg.rag.top_k,
              "token_budget": cfg.rag.token_budget, "embedder": retriever.embedder, "machine": machine(),
              "torch_threads": torch.get_num_threads(), "cloze_limit": args.cloze_limit, "sets": {}}
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    command = "python benchmarks/bench_rag.py accuracy " + " ".join(
        [f"--qasc {args.qasc} --mmlu {args.mmlu} --scoring {' '.join(args.scoring)}"]
        + ([f"--cloze-limit {args.cloze_limit}"] if args.cloze_limit and "cloze" in args.scoring else []))
    merged = previous.get("model") == args.model and all(
        previous.get("sets", {}).get(n, {}).get("n") == len(r) for n, r in sets.items())
    result["commands"] = (previous.get("commands", []) if merged else []) + [command]
    passages = {}
    for name, records in sets.items():
        t = time.perf_counter()
        passages[name] = retrieve_passages(retriever, records, cfg.rag.top_k, cfg.rag.token_budget, scorer.tok)
        entry = result["sets"].setdefault(name, {"n": len(records), "retrieval_s": round(time.perf_counter() - t, 2),
                                                 "cells": {}})
        if merged:  # cells of another scoring from an earlier run on the same questions stay (`--scoring cloze`)
            entry["cells"] = {k: v for k, v in previous["sets"][name]["cells"].items()
                              if k.split("/")[0] not in args.scoring}
        if name == "qasc_dev":
            entry["gold_fact_retrieved"] = round(qasc_gold_hits(root, records, passages[name]), 3)
    for scoring in args.scoring:  # letter for every set first: cloze costs a forward pass per choice
        for name, records in sets.items():
            entry = result["sets"][name]
            n = min(len(records), args.cloze_limit) if scoring == "cloze" and args.cloze_limit else len(records)
            preds = {}
            for rag in (False, True):
                t, load = time.perf_counter(), load_avg()
                preds[rag] = score_records(scorer, records[:n], scoring, header=True,
                                           passages=passages[name][:n] if rag else None, progress=False)
                cell = entry["cells"][f"{scoring}/{'rag' if rag else 'none'}"] = {
                    "n": n, "accuracy": round(accuracy(preds[rag])["accuracy"], 4),
                    "pred_letters": dict(sorted(Counter(p.pred for p in preds[rag]).items())),
                    "s": round(time.perf_counter() - t, 1), "load": load}
                print(name, scoring, "rag" if rag else "none", cell, flush=True)
            right = {r: [p.pred == p.gold for p in preds[r]] for r in preds}
            entry["cells"][f"{scoring}/rag"]["fixed"] = sum(b and not a for a, b in zip(right[False], right[True]))
            entry["cells"][f"{scoring}/rag"]["broken"] = sum(a and not b for a, b in zip(right[False], right[True]))
            OUT.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2))  # after every cell pair: partial results survive
    result["date"] = time.strftime("%Y-%m-%d")
    out_path.write_text(json.dumps(result, indent=2))
    return result


# --- embedder fine-tuning ---------------------------------------------------------------------------------
def run_embedder(args) -> dict:
    from stemqa.data.paths import data_root
    from stemqa.rag.tune_embedder import tune_and_evaluate
    from stemqa.ray_utils import init_ray

    init_ray("local", num_cpus=os.cpu_count())
    load, t = load_avg(), time.perf_counter()
    result = tune_and_evaluate(data_root(), OUT / "tuned_embedder", steps=args.steps, n_triplets=args.triplets,
                               batch_size=args.tune_batch, qasc_questions=args.qasc)
    result.update(date=time.strftime("%Y-%m-%d"), load=load, load_after=load_avg(), machine=machine(),
                  total_wall_s=round(time.perf_counter() - t, 1))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "embedder.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


# --- BENCHMARKS.md ----------------------------------------------------------------------------------------
def accuracy_table(r: dict) -> str:
    lines = ["| set | n | scoring | no retrieval | with retrieval | fixed / broken | load avg |",
             "|---|---|---|---|---|---|---|"]
    for name, e in r["sets"].items():
        for scoring in ("letter", "cloze"):
            a, b = e["cells"].get(f"{scoring}/none"), e["cells"].get(f"{scoring}/rag")
            if a and b:
                lines.append(f"| {name} | {a.get('n', e['n'])} | {scoring} | {a['accuracy']:.1%} | {b['accuracy']:.1%} | "
                             f"{b['fixed']} / {b['broken']} | {a['load']}, {b['load']} |")
    return "\n".join(lines)


def embedder_table(r: dict) -> str:
    b, a = r["before"], r["after"]
    rows = [("QASC recall@5 (gold facts)", "recall@5"), ("QASC hit@5", "hit@5"),
            ("MMLU same-subject P@5 (held out)", "mmlu_same_subject_p@5")]
    return "\n".join(["| metric | all-MiniLM-L6-v2 | fine-tuned | change |", "|---|---|---|---|"]
                     + [f"| {label} | {b[k]:.3f} | {a[k]:.3f} | {a[k] - b[k]:+.3f} |" for label, k in rows])


def write_section() -> None:
    acc = json.loads((OUT / "accuracy.json").read_text()) if (OUT / "accuracy.json").exists() else None
    emb = json.loads((OUT / "embedder.json").read_text()) if (OUT / "embedder.json").exists() else None
    parts = [SECTION, ""]
    if acc:
        q, m = acc["sets"].get("qasc_dev", {}), acc["sets"].get("mmlu_stem", {})
        parts += [
            "Command: " + " then ".join(f"`{c}`" for c in acc.get("commands", [])) +
            f" ({acc.get('date', '')}, {acc['machine']}).",
            "",
            f"{acc['model']}, 0-shot with the subject header; the same questions scored without and with the top "
            f"{acc['top_k']} passages of the demo index ({acc['chunks']} chunks: OpenStax physics and chemistry "
            f"paragraphs + QASC facts, {acc['embedder']}), cut to {acc['token_budget']} model tokens. MMLU slice: "
            f"{', '.join(MMLU_SUBJECTS)} (the subjects the corpus covers), the first questions of each. "
            f"QASC: a gold fact is among the retrieved passages for {q.get('gold_fact_retrieved', float('nan')):.0%} "
            "of the questions. fixed / broken = questions retrieval turns right / wrong.",
            "",
            accuracy_table(acc), ""]
    if emb:
        parts += [
            f"Embedder fine-tuning: `python benchmarks/bench_rag.py embedder --qasc {emb['qasc_questions']} "
            f"--steps {emb['steps']}` ({emb['date']}, {emb['machine']}).",
            "",
            f"Ray Train job (1 worker), MultipleNegativesRankingLoss on {emb['triplets']} MMLU triplets (anchor, "
            f"same-subject positive, other-subject negative) from 70% of {', '.join(emb['subjects'])}; "
            f"{emb['steps']} steps of {emb['batch_size']}, loss {emb['train'].get('loss_first', 0):.3f} -> "
            f"{emb['train'].get('loss_last', 0):.3f}, {emb['train_wall_s']:.0f} s wall (load avg {emb['load']} -> "
            f"{emb['load_after']}). Held out: the other 30% "
            f"({emb['mmlu_held_out']} questions, ranked against the {emb['mmlu_train']} training questions) and "
            f"{emb['qasc_questions']} QASC dev questions (never trained on) against an index of their "
            f"{2 * emb['qasc_questions']} gold facts (fewer after de-duplication).",
            "",
            embedder_table(emb), ""]
    body = "\n".join(parts).rstrip() + "\n"
    text = BENCH_MD.read_text()  # read right before writing: the file is shared
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        _, nxt, tail = rest.partition("\n## ")
        text = head + body + (("\n## " + tail) if nxt else "")
    else:
        text = text.rstrip() + "\n\n" + body
    BENCH_MD.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=["accuracy", "embedder", "all"], default="all")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--qasc", type=int, default=None, help="QASC dev questions (accuracy: 100, embedder: 300)")
    p.add_argument("--mmlu", type=int, default=100)
    p.add_argument("--scoring", nargs="+", default=["letter", "cloze"], choices=["letter", "cloze"])
    p.add_argument("--cloze-limit", type=int, default=None,
                   help="cloze cells score only the first N questions of each set (cloze costs a forward pass per "
                        "choice: 8 for QASC)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--index", default=str(OUT / "demo_index"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--triplets", type=int, default=480)
    p.add_argument("--tune-batch", type=int, default=16)
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args(argv)
    if args.part in ("accuracy", "all"):
        run_accuracy(argparse.Namespace(**{**vars(args), "qasc": args.qasc or 100}))
    if args.part in ("embedder", "all"):
        run_embedder(argparse.Namespace(**{**vars(args), "qasc": args.qasc or 300}))
    if not args.no_markdown:
        write_section()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
