"""Questions/s of stemqa's evaluator vs lm-eval-harness on the same MMLU items and model (goal: >= 3x).

    .venv/bin/python benchmarks/bench_eval.py [--model smollm2-135m-instruct] [--n 240] [--batch-size 8] [--fewshot 5]

Both run in this process with the same torch threads, float32 on CPU, letter scoring, k-shot (the subject's
first k MMLU dev questions, as lm-eval's MMLU) with the subject header; each model is loaded before its timer
starts. lm-eval runs the local task of stemqa.eval.lmeval_task
(its MMLU prompt over the same records); its time includes building the task (a few seconds), ours includes
prompt rendering. Prints a markdown row and updates the "Evaluator vs lm-eval" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
SECTION = "## Evaluator vs lm-eval"
SUBJECTS = ["college_physics", "high_school_chemistry", "high_school_biology", "elementary_mathematics",
            "college_computer_science", "high_school_physics", "college_mathematics", "astronomy"]


def mmlu_dev(root: Path, k: int) -> dict:
    from stemqa.data.mcq import load_file

    if not k:
        return {}
    return {s: load_file(root / "mcq" / "mmlu" / "dev" / f"{s}_dev.csv", "mmlu_csv", limit=k)[0] for s in SUBJECTS
            if (root / "mcq" / "mmlu" / "dev" / f"{s}_dev.csv").exists()}


def mmlu_items(root: Path, n: int):
    from stemqa.data.mcq import load_file

    per = -(-n // len(SUBJECTS))
    recs = []
    for s in SUBJECTS:
        path = root / "mcq" / "mmlu" / "test" / f"{s}_test.csv"
        if path.exists():
            recs += load_file(path, "mmlu_csv", limit=per)[0]
    return recs[:n]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}"


def update_markdown(row: str, command: str, notes: str) -> None:
    header = ("| date | model | shots | items | batch | ours q/s | lm-eval q/s | speed-up (wall) | speed-up (CPU s) "
              "| agree | machine |\n|---|---|---|---|---|---|---|---|---|---|---|")
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\nCommand: `{command}`\n\n{notes}\n\n{header}\n"
    head, _, rest = text.partition(SECTION)
    body, nxt, tail = rest.partition("\n## ")
    lines = body.rstrip().split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))  # after the table's last row, before notes
    body = "\n".join(lines[:last + 1] + [row] + lines[last + 1:]) + "\n"
    BENCH_MD.write_text(head + SECTION + body + (("\n## " + tail) if nxt else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=240, help="MMLU STEM test items")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for both")
    p.add_argument("--fewshot", type=int, default=5, help="k-shot examples from each subject's dev split")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    from stemqa.eval.lmeval_task import load_lmeval_model, run_lmeval
    from stemqa.eval.run import load_scorer, score_records
    from stemqa.models import resolve_model

    records = mmlu_items(Path(args.data), args.n)
    if not records:
        sys.exit(f"no MMLU items under {args.data}")
    model_dir = str(resolve_model(args.model))

    scorer = load_scorer(args.model, args.batch_size)
    # CPU seconds (process_time) as well as wall: on a shared machine wall time mostly measures the neighbours
    t0, c0 = time.perf_counter(), time.process_time()
    dev = mmlu_dev(Path(args.data), args.fewshot)
    ours = score_records(scorer, records, fewshot=dev, progress=False)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0

    lm = load_lmeval_model(model_dir, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        c0 = time.process_time()
        theirs = run_lmeval(model_dir, records, Path(tmp), batch_size=args.batch_size, lm=lm, fewshot=dev,
                            num_fewshot=args.fewshot)
        theirs_cpu = time.process_time() - c0
    agree = sum(p.pred == t for p, t in zip(ours, theirs["pred"])) / len(records)

    n = len(records)
    ours_qps, theirs_qps = n / ours_s, n / theirs["time_s"]
    cpu_ratio = theirs_cpu / ours_cpu
    row = (f"| {time.strftime('%Y-%m-%d')} | {args.model} | {args.fewshot} | {n} | {args.batch_size} | {ours_qps:.1f} | "
           f"{theirs_qps:.1f} | {ours_qps / theirs_qps:.1f}x | {cpu_ratio:.1f}x | {agree:.1%} | {machine()} |")
    print(f"ours: {ours_s:.1f} s wall / {ours_cpu:.1f} s CPU; lm-eval: {theirs['time_s']:.1f} s wall / "
          f"{theirs_cpu:.1f} s CPU")
    print(row)
    if not args.no_write:
        cmd = (f"python benchmarks/bench_eval.py --model {args.model} --n {args.n} --batch-size {args.batch_size} "
               f"--fewshot {args.fewshot}")
        notes = ("Letter scoring, k-shot (the subject's first k dev questions) with subject header, float32 CPU, same process and threads; models loaded "
                 "before timing. Speed-up (wall) = ours q/s / lm-eval q/s; speed-up (CPU s) = lm-eval's process CPU "
                 "seconds / ours, which a busy shared machine distorts less; agree = same predicted letter. Timings on a "
                 "shared machine are noisy: compare ratios from one run, not absolute q/s across rows.")
        update_markdown(row, cmd, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
