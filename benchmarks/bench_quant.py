"""Quantization trade-off table (issue 5): one row per method and setting.

Columns: MCQA accuracy (letter scoring, stemqa.eval) on an MMLU STEM slice and on ARC-Easy, size on disk,
peak memory during evaluation (process RSS on CPU, peak VRAM on a GPU), generation tokens/s at batch 1 and
at batch 8, quantization wall time. Rows this machine cannot run say why instead of disappearing. Writes
benchmarks/out/quant/{rows.json,tradeoff.png} and the "Quantization trade-off" section of BENCHMARKS.md.

    python benchmarks/bench_quant.py                                 # SmolLM2-135M, every method
    python benchmarks/bench_quant.py --model tiny-qwen3 --group-size 32 --n 8 --no-write   # smoke run
    python benchmarks/bench_quant.py --methods gptq --calib-sizes 20,200,2000   # calibration-size study
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out" / "quant"
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
SECTION = "## Quantization trade-off"
METHODS = ["gptq", "smoothquant-gptq", "int8-weight", "bnb-8bit", "bnb-4bit"]
MMLU_STEM = ["college_physics", "high_school_chemistry", "high_school_biology", "elementary_mathematics"]
GEN_TOKENS = 32


def load_sets(n: int):
    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_source
    from stemqa.data.paths import data_root

    root = data_root()
    mmlu, _ = load_source(McqSource(path="mcq/mmlu/test", format="mmlu_csv", name="mmlu", subjects=MMLU_STEM), root)
    arc, _ = load_source(McqSource(path="mcq/arc/ARC-Easy-test.jsonl", format="arc_jsonl", subject="science",
                                   limit=n), root)
    per = max(1, n // len(MMLU_STEM))  # an even slice of each subject, not the first subject only
    mmlu = [q for s in MMLU_STEM for q in [r for r in mmlu if r.subject == s][:per]]
    calib, _ = load_source(McqSource(path="mcq/arc/ARC-Easy-train.jsonl", format="arc_jsonl", subject="science"),
                           root)
    return {"mmlu_stem": mmlu, "arc_easy": arc}, calib


def _quantize_task(qcfg, model, calib, out_dir):
    import torch

    from stemqa.quant import quantize

    torch.set_num_threads(max(1, int(qcfg.num_cpus)))
    return quantize(qcfg, model, calib, Path(out_dir))


def _measure_task(model_dir: str, sets: dict, out_dir: str, threads: int) -> dict:
    """Accuracy, peak memory and generation speed of one model, in a fresh process (so ru_maxrss is its own)."""
    import resource

    import torch

    from stemqa.data.prompt import harness_prompt
    from stemqa.eval.run import evaluate, load_scorer

    torch.set_num_threads(threads)
    scorer = load_scorer(model_dir)
    row = {}
    for name, records in sets.items():
        row[name] = evaluate(model_dir, records, Path(out_dir) / name, scorer=scorer, progress=False)["accuracy"]
    model, tok = scorer.model, scorer.tok
    tok.padding_side = "left"
    prompt = harness_prompt(next(iter(sets.values()))[0])
    for batch in (1, 8):
        enc = tok([prompt] * batch, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        row[f"tok_s_b{batch}"] = round(batch * GEN_TOKENS / (time.perf_counter() - t), 1)
    if torch.cuda.is_available():
        row["peak_mem_mb"], row["mem_kind"] = round(torch.cuda.max_memory_allocated() / 2**20, 1), "VRAM"
    else:
        row["peak_mem_mb"], row["mem_kind"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "RSS"
    return row


def settings(args):
    """(label, QuantConfig or None for full precision) for every row."""
    from stemqa.config.schema import QuantConfig
    from stemqa.quant import METHODS as METHODS_TABLE

    rows = [("full precision", None)]
    for m in args.methods.split(","):
        sizes = [int(s) for s in args.calib_sizes.split(",")] if m in ("gptq", "smoothquant-gptq") else [0]
        for c in sizes:
            q = QuantConfig(method=m, group_size=args.group_size, calibration_samples=max(1, c), num_cpus=args.cpus,
                            bits=8 if m == "smoothquant-gptq" else 4)
            method = METHODS_TABLE[m]
            label = f"{m} W{method.bits(q)}" + (f"A{method.act_bits(q)}" if method.act_bits(q) else "")
            label += f" g{method.group_size(q)}" if method.group_size(q) else ""
            rows.append((label + (f" C={c}" if c else ""), q))
    return rows


def run(args) -> list[dict]:
    import ray

    from stemqa.models import resolve_model
    from stemqa.quant import missing_requirements
    from stemqa.ray_utils import init_ray

    init_ray(args.address, num_cpus=None if args.address else 2)
    sets, calib = load_sets(args.n)
    model = str(resolve_model(args.model))
    # max_calls=1: a fresh worker process per task, so each row's peak RSS is its own
    quant_task = ray.remote(num_cpus=args.cpus, max_calls=1, max_retries=0)(_quantize_task)
    measure_task = ray.remote(num_cpus=args.cpus, max_calls=1, max_retries=0)(_measure_task)
    rows = []
    for label, q in settings(args):
        row = {"setting": label, "model": args.model}
        missing = missing_requirements(q.method) if q else []
        if missing:
            rows.append({**row, "note": "cannot run here: missing " + "; ".join(missing)})
            continue
        try:
            if q is None:
                model_dir, row["size_mb"], row["quant_s"] = model, round(sum(
                    p.stat().st_size for p in Path(model).glob("*.safetensors")) / 1e6, 1), 0.0
            else:
                res = ray.get(quant_task.remote(q, model, calib, str(OUT / "models" / label.replace(" ", "_"))))
                model_dir, row["size_mb"], row["quant_s"] = res["model_dir"], round(res["size_mb"], 1), res["wall_s"]
            row.update(ray.get(measure_task.remote(model_dir, sets, str(OUT / "eval" / label.replace(" ", "_")),
                                                   max(1, int(args.cpus)))))
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
            cause = getattr(e, "cause", None) or e  # a RayTaskError carries the task's own exception
            row["note"] = f"failed: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| setting | MMLU-STEM acc | ARC-Easy acc | size MB | peak mem MB | tok/s b1 | tok/s b8 | quant s "
            "| note |\n|---|---|---|---|---|---|---|---|---|")
    def f(r, k):
        v = r.get(k)
        return "" if v is None else f"{v:.3f}" if k in ("mmlu_stem", "arc_easy") else str(v)

    lines = [f"| {r['setting']} | {f(r, 'mmlu_stem')} | {f(r, 'arc_easy')} | {f(r, 'size_mb')} | "
             f"{f(r, 'peak_mem_mb')} {r.get('mem_kind', '')} | {f(r, 'tok_s_b1')} | {f(r, 'tok_s_b8')} | "
             f"{f(r, 'quant_s')} | {r.get('note', '')} |" for r in rows]
    return head + "\n" + "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "peak_mem_mb" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max((r["tok_s_b8"] for r in ok), default=1) or 1
    for r in ok:
        acc = (r["mmlu_stem"] + r["arc_easy"]) / 2
        ax.scatter(r["peak_mem_mb"], acc, s=40 + 400 * r["tok_s_b8"] / top, alpha=0.6)
        ax.annotate(r["setting"], (r["peak_mem_mb"], acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"peak memory during evaluation (MB, {ok[0]['mem_kind'] if ok else 'RSS'})")
    ax.set_ylabel("mean accuracy (MMLU-STEM, ARC-Easy)")
    ax.set_title(f"Quantization trade-off ({ok[0]['model'] if ok else ''}); marker size ∝ tokens/s at batch 8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-sizes", default="20", help="comma-separated |C| for the calibrated methods")
    p.add_argument("--n", type=int, default=80, help="questions per evaluation set")
    p.add_argument("--cpus", type=float, default=2, help="CPUs per Ray task (and torch threads)")
    p.add_argument("--address", default=None, help="Ray address (default: a private local instance)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    (OUT / "rows.json").write_text(json.dumps(rows, indent=2))
    figure(rows, OUT / "tradeoff.png")
    md = table(rows)
    print(md)
    if not args.no_write:
        command = "python benchmarks/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
        notes = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs; {args.n} questions "
                 "per set; figure: benchmarks/out/quant/tradeoff.png")
        text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
        head, _, rest = text.partition(SECTION)
        _, nxt, tail = rest.partition("\n## ")
        BENCH_MD.write_text(head.rstrip() + f"\n\n{SECTION}\n\nCommand: `{command}`\n\n{notes}\n\n{md}\n"
                            + (("\n## " + tail) if nxt else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
