"""Scale: how each stage's time grows with its work on this machine, with a fitted exponent to predict bigger runs.

    .venv/bin/python benchmarks/bench_scale.py [--stages embed,faiss,eval,sft] [--embed-sizes 1000,10000,100000]
        [--faiss-sizes 10000,100000,1000000] [--eval-sizes 100,1000,5000] [--sft-sizes 1000,10000]
        [--no-write] [--markdown benchmarks/BENCHMARKS.md]

Per stage, at each size n (one after the other, nothing else of ours running):
- embed: n texts (bench_embed.bench_texts: MCQ stems + OpenStax paragraphs cut to 300 characters, repeated),
  all-MiniLM-L6-v2, batch 64, measured by bench_embed's own child processes (one per measurement): single-process
  sentence-transformers, then stemqa.embed's Ray Data job on a private local Ray (2 actors x 0.5 CPU). Ray's time
  is the job end to end (actor start-up included, ray.init apart); start-up = ray.init + time to the first batch.
- faiss: n random 384-d unit vectors (bench_index.synthetic_set), flat and ivf made as `stemqa rag build` makes
  them (bench_index.bench_set -> stemqa.rag.index.make_faiss_index; ivf: nlist ~4*sqrt(n), nprobe 16, trained on at
  most 100k vectors): build seconds and p50 of 200 one-at-a-time top-5 queries.
- eval: stemqa's scorer (stemqa.eval.run.score_records, as `stemqa eval`: 0-shot, letter scoring, subject header,
  eval.batch_size) on n MMLU test questions in a seeded shuffled order (STEM subjects when they are enough for the
  largest size, else all subjects), in this process; loading the model (the fixed start-up) and one warm-up batch
  are outside the timed window.
- sft: `stemqa sft --config study` (Ray Train + DeepSpeed on a private Ray, as bench_quality.py runs it) on a hashed
  subset of n training questions of the study preset (bench_quality.training_pool("all", n)), question -> answer
  text (sft.data=qa), packed, batch 8, 1 worker x 2 CPUs, ZeRO-0, one epoch, no held-out eval. Wall = the whole
  command (process start, Ray, workers, checkpoints, save); steps = the sum of history.jsonl's step `seconds`;
  start-up and the rest = wall - steps.
For every series: t = a * n^b fitted by least squares on log t vs log n; 2^b is what doubling the work does to the
time and a * (10 n_max)^b the prediction for ten times the largest size. With fixed start-up costs in the time, b
comes out below the steady-state exponent at small n. Load averages are recorded around each stage: the machine
is shared, so wall times are only as steady as its load. Prints a JSON summary; unless --no-write, rewrites the
blocks of the measured stages in the "Scale: how cost grows" section (the other stages' blocks stay).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch, and inherited by every child: OpenMP threads that spin at barriers burned 3-4x the CPU seconds per
# scored question here while other jobs held the 2 cores (measured: 1.5 vs 0.4 CPU s/question). bench_quality's too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SECTION = "## Scale: how cost grows"
OUT = ROOT / "benchmarks" / "out" / "scale"
DATA = ROOT.parent / "shared" / "data"
MODEL = "smollm2-135m-instruct"
STAGES = ["embed", "faiss", "eval", "sft"]
DEFAULT_SIZES = {"embed": [1000, 10000, 100000], "faiss": [10000, 100000, 1000000], "eval": [100, 1000, 5000],
                 "sft": [1000, 10000]}
EMBED = {"batch_size": 64, "actors": 2, "cpus_per_actor": 0.5}  # bench_embed.py's defaults
EMBED_GOAL = 0.9  # issue 22: Ray Data at 100k texts within 0.9x of single-process throughput
SFT_SETS = ["sft.data=qa", "sft.packing=true", "sft.batch_size=8", "sft.grad_accum=1", "sft.epochs=1",
            "sft.eval_fraction=0.0", "sft.resources.num_workers=1", "sft.resources.cpus_per_worker=2",
            "sft.resources.zero_stage=0"]


def load1() -> float:
    return round(os.getloadavg()[0], 1)


def fit(ns: list[int], ts: list[float]) -> dict | None:
    """t = a * n^b by least squares on log t = log a + b log n; None without two sizes or a non-positive time."""
    if len(set(ns)) < 2 or min(ts) <= 0:
        return None
    b, log_a = np.polyfit(np.log(ns), np.log(ts), 1)
    n10 = 10 * max(ns)
    return {"a": math.exp(log_a), "b": float(b), "doubling": 2 ** float(b), "n_pred": n10,
            "t_pred": math.exp(log_a) * n10 ** float(b)}


def fit_line(what: str, f: dict | None, unit: str = "s") -> str:
    if f is None:
        return f"{what}: no fit (needs two sizes and positive times)"
    return (f"{what}: t = {f['a']:.3g} * n^{f['b']:.2f}; doubling the work multiplies time by 2^{f['b']:.2f} = "
            f"{f['doubling']:.2f}; predicted at n = {f['n_pred']:,}: {f['t_pred']:.3g} {unit}")


# --- the stages: each returns {"rows", "fits", "notes", ...} -------------------------------------------------
def stage_embed(sizes: list[int]) -> dict:
    import bench_embed

    rows = []
    for n in sizes:
        args = argparse.Namespace(n=n, **EMBED)
        single = bench_embed._child("single", args)
        ray = bench_embed._child("ray", args, ["--actors", str(EMBED["actors"])])
        rows.append({"n": n, "single_s": single["wall_s"], "single_tps": single["texts_per_s"],
                     "single_cpu_s": single["cpu_s"], "ray_s": ray["wall_s"], "ray_cpu_s": ray["cpu_s"],
                     "ray_tps": ray["e2e_texts_per_s"], "ray_steady_tps": ray["steady_texts_per_s"],
                     "ray_init_s": ray["ray_init_s"], "ray_first_batch_s": ray["startup_s"],
                     "ratio": ray["e2e_texts_per_s"] / single["texts_per_s"],
                     "steady_ratio": ray["steady_texts_per_s"] / single["texts_per_s"],
                     "max_abs_diff": ray["max_abs_diff_vs_single"], "complete": ray["complete"],
                     "load": [single["load_before"], ray["load_after"]]})
    ns = [r["n"] for r in rows]
    fits = {"single process": fit(ns, [r["single_s"] for r in rows]),
            "Ray Data (end to end)": fit(ns, [r["ray_s"] for r in rows])}
    at = next((r for r in rows if r["n"] == 100_000), None)
    goal = f"Goal (Ray Data at 100k texts within {EMBED_GOAL}x of single-process throughput): "
    if at:  # end to end: actor start-up included, as a user waits for it
        goal += (f"{'met' if at['ratio'] >= EMBED_GOAL else 'not met'}, {at['ratio']:.2f}x end to end ({at['ray_tps']:.1f} "
                 f"vs {at['single_tps']:.1f} texts/s; {at['steady_ratio']:.2f}x once the actors are up).")
    else:
        goal += (f"not evaluated, 100k is not among the sizes; at {rows[-1]['n']:,} texts Ray Data ran at "
                 f"{rows[-1]['ratio']:.2f}x end to end.")
    start = [r["ray_init_s"] + r["ray_first_batch_s"] for r in rows]
    diffs = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
    notes = [goal, f"Fixed start-up of the Ray Data job (ray.init + actors up + first batch): "
             f"{min(start):.1f}-{max(start):.1f} s across sizes; the single process has none in its timed window.",
             f"Ray Data returned every text ({'yes' if all(r['complete'] for r in rows) else 'NO'}), its vectors "
             + (f"within {max(diffs):.1e} of the single-process ones." if diffs else "not compared.")]
    return {"rows": rows, "fits": fits, "notes": notes}


def stage_faiss(sizes: list[int], n_queries: int = 200, ivf_train: int = 100_000) -> dict:
    import bench_index

    rows = []
    for n in sizes:
        vectors, queries = bench_index.synthetic_set(n, 384, n_queries)
        rows += bench_index.bench_set("synthetic", vectors, queries, ["flat", "ivf"], ivf_train)
        del vectors
    fits = {}
    for kind in ("flat", "ivf"):
        rs = [r for r in rows if r["kind"] == kind]
        ns = [r["n"] for r in rs]
        fits[f"{kind} build"] = fit(ns, [r["build_s"] for r in rs])
        fits[f"{kind} p50 query"] = fit(ns, [r["p50_ms"] / 1000 for r in rs])
    return {"rows": rows, "fits": fits, "notes": [], "queries": n_queries}


def mmlu_pool(largest: int) -> tuple[list, str]:
    """MMLU test questions in a fixed shuffled order (each size a sample of the same mix): STEM subjects when there
    are at least `largest` of them, else every subject."""
    from stemqa.data.mcq import load_file
    from stemqa.data.splits import MMLU_STEM_SUBJECTS

    every = {p.name[:-len("_test.csv")]: load_file(p, "mmlu_csv")[0]
             for p in sorted((DATA / "mcq" / "mmlu" / "test").glob("*_test.csv"))}
    stem = [q for s in MMLU_STEM_SUBJECTS for q in every.get(s, [])]
    allq = [q for qs in every.values() for q in qs]
    pool, what = (stem, f"MMLU STEM test questions ({len(stem)} available)") if len(stem) >= largest else \
        (allq, f"MMLU test questions of all {len(every)} subjects (STEM alone has {len(stem)}, all {len(allq)})")
    random.Random(0).shuffle(pool)
    if len(pool) < largest:
        what += f"; only {len(pool)} exist, so the largest size is {len(pool)}"
    return pool, what


def stage_eval(sizes: list[int]) -> dict:
    import torch

    from stemqa.config.schema import EvalConfig
    from stemqa.eval.run import load_scorer, score_records

    pool, what = mmlu_pool(max(sizes))
    batch = EvalConfig().batch_size
    t = time.perf_counter()
    scorer = load_scorer(MODEL, batch)
    load_s = time.perf_counter() - t
    score_records(scorer, pool[:batch], progress=False)  # warm-up: first-call allocations, not per-question cost
    rows = []
    for n in dict.fromkeys(min(n, len(pool)) for n in sizes):
        l0, t0, c0 = load1(), time.perf_counter(), time.process_time()
        score_records(scorer, pool[:n], progress=False)
        s, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"n": n, "s": s, "q_per_s": n / s, "cpu_s": cpu, "load": [l0, load1()]})
        print("eval", json.dumps(rows[-1]), flush=True)
    notes = [f"Fixed start-up: loading the model took {load_s:.1f} s (outside the timed window)."]
    ns = [r["n"] for r in rows]
    fits = {"scoring (wall)": fit(ns, [r["s"] for r in rows]), "scoring (CPU s)": fit(ns, [r["cpu_s"] for r in rows])}
    return {"rows": rows, "fits": fits, "notes": notes,
            "questions": what, "batch_size": batch, "threads": torch.get_num_threads(), "model_load_s": load_s}


def stage_sft(sizes: list[int], extra_sets: list[str]) -> dict:
    import bench_quality  # its stemqa() runs the CLI with the worker priority and OpenMP waits fixed

    rows, sets = [], SFT_SETS + extra_sets
    for n in sizes:
        pool = bench_quality.training_pool("all", n)
        samples = sum(1 for line in pool.read_text().splitlines() if line.strip())
        work = Path(tempfile.mkdtemp(prefix="bench-scale-sft-"))
        try:  # the run's checkpoints carry optimizer state (GBs): removed after each size
            l0 = load1()
            res, wall = bench_quality.stemqa(["sft", "--config", "study", "--train", str(pool), "--out", str(work),
                                              *bench_quality.sets_flags(sets)])
            hist = [json.loads(x) for x in (work / "history.jsonl").read_text().splitlines() if x.strip()]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        steps = [h for h in hist if h["kind"] == "step"]
        steps_s, tokens = sum(h["seconds"] for h in steps), sum(h["tokens"] for h in steps)
        rows.append({"n": samples, "wall_s": wall, "steps": len(steps), "steps_s": steps_s, "tokens": tokens,
                     "tokens_per_s": tokens / steps_s, "other_s": wall - steps_s,
                     "train_samples": res.get("metrics", {}).get("train_samples"), "load": [l0, load1()]})
        print("sft", json.dumps(rows[-1]), flush=True)
    ns = [r["n"] for r in rows]
    other = [r["other_s"] for r in rows]
    notes = [f"Fixed start-up and the rest (process start, Ray, worker set-up, checkpoints, save, teardown = wall - "
             f"steps): {min(other):.0f}-{max(other):.0f} s across sizes."]
    if short := [n for n, r in zip(sizes, rows) if r["n"] < n]:
        notes.append(f"The study preset has only {rows[-1]['n']:,} training questions: asked for {short}, trained on fewer.")
    return {"rows": rows, "fits": {"wall (whole command)": fit(ns, [r["wall_s"] for r in rows]),
                                   "steps only": fit(ns, [r["steps_s"] for r in rows])},
            "notes": notes, "sets": sets}


# --- BENCHMARKS.md -------------------------------------------------------------------------------------------
def md_table(cols: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                         for r in rows]


def tables(stage: str, res: dict) -> list[str]:
    r, load = res["rows"], lambda x: f"{x['load'][0]}/{x['load'][1]}"
    if stage == "embed":
        return md_table(["texts", "single s (CPU s)", "single texts/s", "Ray Data s (CPU s)", "Ray Data texts/s (steady)",
                         "Ray / single (steady)", "Ray start-up s (init + to 1st batch)", "load avg"],
                        [[f"{x['n']:,}", f"{x['single_s']:.1f} ({x['single_cpu_s']:.0f})", f"{x['single_tps']:.1f}",
                          f"{x['ray_s']:.1f} ({x['ray_cpu_s']:.0f})", f"{x['ray_tps']:.1f} ({x['ray_steady_tps']:.1f})",
                          f"{x['ratio']:.2f} ({x['steady_ratio']:.2f})",
                          f"{x['ray_init_s']:.1f} + {x['ray_first_batch_s']:.1f}", load(x)] for x in r])
    if stage == "faiss":
        return md_table(["vectors", "index", "build s", "p50 ms", "p99 ms", "recall@5 vs flat", "load avg"],
                        [[f"{x['n']:,}", x["kind"] + (f" (nlist {x['nlist']}, nprobe {x['nprobe']})" if "nlist" in x else ""),
                          f"{x['build_s']:.3f}", f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}",
                          f"{x['recall@5']:.3f}" if "recall@5" in x else "exact", x["load"]] for x in r])
    if stage == "eval":
        return md_table(["questions", "wall s", "q/s", "process CPU s", "load avg"],
                        [[f"{x['n']:,}", f"{x['s']:.1f}", f"{x['q_per_s']:.2f}", f"{x['cpu_s']:.1f}", load(x)] for x in r])
    return md_table(["samples", "steps", "wall s (whole command)", "steps s", "start-up + rest s", "tokens",
                     "tokens/s (steps)", "load avg"],
                    [[f"{x['n']:,}", x["steps"], f"{x['wall_s']:.0f}", f"{x['steps_s']:.1f}", f"{x['other_s']:.0f}",
                      f"{x['tokens']:,}", f"{x['tokens_per_s']:.0f}", load(x)] for x in r])


WHAT = {
    "embed": lambda s: f"all-MiniLM-L6-v2, batch {EMBED['batch_size']}; Ray Data: {EMBED['actors']} actors x "
                       f"{EMBED['cpus_per_actor']} CPU on a private local Ray; each measurement in its own process.",
    "faiss": lambda s: f"random 384-d unit vectors; one top-5 query at a time, {s['queries']} queries after 10 warm-up. "
                       "Random vectors have no cluster structure, so ivf's recall here is its worst case, a measure of "
                       "time only; recall on real embeddings is in the FAISS index section.",
    "eval": lambda s: f"{MODEL}, {s['questions']}, 0-shot, letter scoring, batch {s['batch_size']}, 1 process x "
                      f"{s['threads']} threads.",
    "sft": lambda s: f"`stemqa sft --config study` with {' '.join(s['sets'])}.",
}


def stage_block(stage: str, res: dict, summary: dict) -> str:
    lines = [f"### {stage} ({res['stage_s']:.0f} s in all; load avg {res['load'][0]} before, {res['load'][1]} after)",
             "", f"Command: `{summary['command']}` ({summary['date']}, {summary['machine']}).", "",
             WHAT[stage](res), "", *tables(stage, res), ""]
    lines += [f"- {fit_line(k, f)}" for k, f in res["fits"].items()] + [f"- {x}" for x in res["notes"]]
    return "\n".join(lines).strip("\n")


def stage_blocks(section_text: str) -> dict[str, str]:
    """The `### <stage> ...` blocks of an existing Scale section, by stage name."""
    blocks = {}
    for chunk in ("\n" + section_text).split("\n### ")[1:]:
        name = chunk.split(" ", 1)[0].split("\n", 1)[0]
        if name in STAGES:
            blocks[name] = ("### " + chunk).strip("\n")
    return blocks


def write_markdown(summary: dict, path: Path) -> None:
    """Replace the blocks of the stages this run measured; the other stages' blocks (each with its own command and
    date) stay as an earlier run wrote them, so one stage can be re-measured alone."""
    from mdsection import replace_section, section_text

    blocks = stage_blocks(section_text(SECTION, path))
    blocks.update({stage: stage_block(stage, res, summary) for stage, res in summary["stages"].items()})
    lines = [SECTION, "", "How each stage's time grows with its work; t = a * n^b fitted by least squares on log-log "
             "over the measured sizes (see benchmarks/bench_scale.py for what each stage runs). Each stage's block "
             "gives the command and date that measured it; every sentence in a block is computed from that run's "
             "numbers."]
    lines += ["\n" + blocks[stage] for stage in STAGES if stage in blocks]
    replace_section(SECTION, "\n".join(lines) + "\n", path)


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    for stage in STAGES:
        p.add_argument(f"--{stage}-sizes", type=sizes, default=DEFAULT_SIZES[stage],
                       help=f"comma list (default {','.join(map(str, DEFAULT_SIZES[stage]))})")
    p.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `stemqa sft --set` overrides (e.g. sft.checkpoint_every=1000)")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(chosen) - set(STAGES):
        p.error(f"unknown stages: {', '.join(sorted(unknown))}")

    run = {"embed": lambda: stage_embed(args.embed_sizes), "faiss": lambda: stage_faiss(args.faiss_sizes),
           "eval": lambda: stage_eval(args.eval_sizes), "sft": lambda: stage_sft(args.sft_sizes, args.sft_set)}
    summary = {"command": "python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "stages": {}}
    for stage in STAGES:
        if stage in chosen:
            l0, t0 = load1(), time.perf_counter()
            res = run[stage]()
            res["load"], res["stage_s"] = [l0, load1()], time.perf_counter() - t0
            summary["stages"][stage] = res
            for k, f in res["fits"].items():
                print(f"{stage}: {fit_line(k, f)}", flush=True)
    summary["command"] = summary["command"].strip()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        write_markdown(summary, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
