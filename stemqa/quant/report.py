"""The quantization trade-off report (`stemqa quant report`): one row per method and setting.

Each row: MCQA letter accuracy (stemqa.eval's scorer) on an MMLU STEM slice and on ARC-Easy, size on disk,
peak memory of the evaluating process (RSS on CPU, peak VRAM on a GPU), greedy generation tokens/s at batch 1
and at a larger batch, quantization wall and CPU time, the 1-min load average. Quantizing and measuring each
run in a fresh spawned process, so one row's peak memory never includes another's. Rows this machine cannot
run (a missing library or backend) or that fail say why instead of disappearing.
Writes <out>/quant_report.{csv,md,json} and <out>/quant_tradeoff.png (accuracy vs peak memory, marker size
proportional to tokens/s at the larger batch, one labelled marker per row).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence

from stemqa.config.schema import QuantConfig

# setting name -> QuantConfig fields (group size, calibration size and QAT settings come from the caller)
SETTINGS = {
    "gptq-w4": dict(method="gptq", bits=4),
    "gptq-w8": dict(method="gptq", bits=8),
    "gptq-w2": dict(method="gptq", bits=2),
    "smoothquant-w8a8": dict(method="smoothquant-gptq", bits=8, act_bits=8),
    "smoothquant-w4a8": dict(method="smoothquant-gptq", bits=4, act_bits=8),
    "int8-weight": dict(method="int8-weight"),
    "bnb-8bit": dict(method="bnb-8bit"),
    "bnb-4bit": dict(method="bnb-4bit"),
    "qat-w4": dict(method="qat", bits=4),
    "qat-w2": dict(method="qat", bits=2),
}
DEFAULT_SETTINGS = ["gptq-w4", "smoothquant-w8a8", "int8-weight", "bnb-8bit", "bnb-4bit", "qat-w4", "qat-w2"]
MMLU_STEM = ["college_physics", "high_school_physics", "college_chemistry", "high_school_chemistry",
             "college_biology", "high_school_biology", "college_mathematics", "high_school_mathematics",
             "elementary_mathematics", "college_computer_science", "electrical_engineering", "astronomy"]
COLUMNS = ["setting", "method", "bits", "act_bits", "group_size", "calib_samples", "mmlu_stem_acc", "arc_easy_acc",
           "size_mb", "peak_mem_mb", "mem_kind", "tok_s_b1", "tok_s_bN", "gen_batch", "quant_wall_s",
           "quant_cpu_s", "eval_wall_s", "rss_before_load_mb", "rss_loaded_mb", "load_avg_1m", "note"]


PARTIAL = "quant_report.partial.jsonl"  # one line per finished row, written as the report goes
PARTIAL_ARGS = "quant_report.partial.args.json"  # what those rows were measured with (for --resume)


@dataclass(frozen=True)
class Row:
    label: str
    qcfg: Optional[QuantConfig]  # None: the full-precision model


def settings(names: Sequence[str], group_size: int, calib_samples: int, calib_study: Sequence[int] = (),
             qat_steps: Optional[int] = None, num_cpus: float = 2, full_precision: bool = True) -> list[Row]:
    """Full precision (unless told not to), then one row per named setting; the gptq-w4 calibration-size study
    rows follow the main gptq-w4 row."""
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown quantization setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    extra = {"qat_steps": qat_steps} if qat_steps is not None else {}

    def row(name: str, c: int) -> Row:
        q = QuantConfig(**SETTINGS[name], group_size=group_size, calibration_samples=c, num_cpus=num_cpus, **extra)
        from stemqa.quant.methods import METHODS

        m = METHODS[q.method]
        label = name + (f" g{m.group_size(q)}" if m.group_size(q) else "") + (f" C={c}" if m.calibrated else "")
        return Row(label, q)

    rows = [Row("full precision", None)] if full_precision else []
    for n in names:  # the calibration-size study rows follow the main gptq-w4 row
        rows += [row(n, calib_samples)] + ([row(n, c) for c in calib_study] if n == "gptq-w4" else [])
    if "gptq-w4" not in names:
        rows += [row("gptq-w4", c) for c in calib_study]
    seen, out = set(), []
    for r in rows:  # a study size equal to the main one is the same row
        if r.label not in seen:
            seen.add(r.label)
            out.append(r)
    return out


def load_eval_sets(n_mmlu: int, n_arc: int, root: Optional[Path] = None) -> dict:
    """An MMLU STEM slice (an even share of each STEM subject's test split) and the first n_arc ARC-Easy test items."""
    from stemqa.data.mcq import load_file
    from stemqa.data.paths import data_root

    root = Path(root or data_root())
    # the subjects the data root has (the packaged sample has 4 of the 12); none is an error
    subjects = [s for s in MMLU_STEM if (root / f"mcq/mmlu/test/{s}_test.csv").exists()]
    if not subjects:
        raise FileNotFoundError(f"{root / 'mcq/mmlu/test'}: none of the MMLU STEM test files ({', '.join(MMLU_STEM)})")
    per = -(-n_mmlu // len(subjects))
    mmlu = [q for s in subjects for q in load_file(root / f"mcq/mmlu/test/{s}_test.csv", "mmlu_csv",
                                                       limit=per)[0]][:n_mmlu]
    arc, _ = load_file(root / "mcq/arc/ARC-Easy-test.jsonl", "arc_jsonl", subject="science", limit=n_arc)
    return {"mmlu_stem": mmlu, "arc_easy": arc}


# ---- work done in a fresh process per row ------------------------------------------------------------

def _quantize_child(qcfg: QuantConfig, model: str, calib: list, out_dir: str, threads: int) -> dict:
    import torch

    from stemqa.quant.run import quantize

    torch.set_num_threads(threads)
    cpu0 = time.process_time()
    res = quantize(qcfg, model, calib, Path(out_dir))
    return {**res, "cpu_s": round(time.process_time() - cpu0, 1)}


def _measure_child(model_dir: str, sets: dict, threads: int, gen_tokens: int, gen_batch: int) -> dict:
    """Accuracy on each set, generation tokens/s at batch 1 and gen_batch, then this process's peak memory.

    On CPU it also records the RSS with the libraries imported but no model (`rss_before_load_mb`) and right
    after loading it (`rss_loaded_mb`): their difference is what the loaded model holds in memory, which is
    not its size on disk when a format is decompressed on load, and peak minus loaded is the evaluation's
    working memory (activations, KV cache, transient copies)."""
    import resource

    import psutil
    import torch
    import transformers  # noqa: F401  imported before the baseline RSS, as load_scorer would import it

    from stemqa.data.prompt import harness_prompt
    from stemqa.eval.run import load_scorer, score_records
    from stemqa.eval.scorer import accuracy

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rss = lambda: round(psutil.Process().memory_info().rss / 2**20, 1)  # noqa: E731
    before = rss()
    scorer = load_scorer(model_dir)
    loaded = rss()
    row = {f"{name}_acc": round(accuracy(score_records(scorer, records, progress=False))["accuracy"], 4)
           for name, records in sets.items()}
    model, tok = scorer.model, scorer.tok
    tok.padding_side = "left"
    prompts = [harness_prompt(q) for q in next(iter(sets.values()))]
    for key, batch in (("tok_s_b1", 1), ("tok_s_bN", gen_batch)):
        enc = tok([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True).to(model.device)
        kw = dict(do_sample=False, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=2, **kw)  # warm-up
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, **kw)
        row[key] = round(batch * gen_tokens / (time.perf_counter() - t), 1)
    row["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    row["rss_before_load_mb"], row["rss_loaded_mb"] = before, loaded
    if torch.cuda.is_available():
        row["peak_mem_mb"], row["mem_kind"] = round(torch.cuda.max_memory_allocated() / 2**20, 1), "VRAM"
    else:  # ru_maxrss is KiB on Linux; this spawned process did nothing but this row
        row["peak_mem_mb"], row["mem_kind"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "RSS"
    return row


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result()


def _size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e6, 1)


def _resumable_rows(work_dir: Path, measuring: dict, resume: bool) -> dict[str, dict]:
    """The rows an earlier (interrupted) report measured under the same measuring settings, by setting label.

    Without `resume` the earlier rows are discarded. Failed rows are measured again. A partial report measured
    under other settings (model, question counts, generation, threads) is refused rather than mixed in."""
    partial, args_file = Path(work_dir) / PARTIAL, Path(work_dir) / PARTIAL_ARGS
    done: dict[str, dict] = {}
    if resume and partial.exists():
        earlier = json.loads(args_file.read_text()) if args_file.exists() else None
        if earlier != measuring:
            raise ValueError(f"cannot resume from {partial}: it was measured with {earlier}, this report uses "
                             f"{measuring}; run without --resume to start over")
        for n, line in enumerate(partial.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{partial}, line {n}: not JSON ({e.msg})") from e
                if not str(row.get("note", "")).startswith("failed"):
                    done[row["setting"]] = row
    partial.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    args_file.write_text(json.dumps(measuring))
    return done


def measure_rows(model: str, rows: Sequence[Row], sets: dict, calib: Sequence, work_dir: Path, threads: int = 2,
                 gen_tokens: int = 32, gen_batch: int = 8, keep_models: bool = False, log=print,
                 resume: bool = False) -> list[dict]:
    """Quantize (if needed) and measure every row, each step in a fresh process; a failing row gets a note.

    Each finished row is appended to PARTIAL at once; `resume` keeps the rows an interrupted report finished."""
    from stemqa.models import resolve_model
    from stemqa.quant.methods import METHODS, missing_requirements

    src = str(resolve_model(model))
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    measuring = {"model": model, "questions": {k: len(v) for k, v in sets.items()}, "calib_pool": len(calib),
                 "threads": threads, "gen_tokens": gen_tokens, "gen_batch": gen_batch}
    done = _resumable_rows(Path(work_dir), measuring, resume)
    out = []
    for r in rows:
        if r.label in done:
            log(f"kept from the interrupted report: {r.label}")
            out.append(done[r.label])
            continue
        q = r.qcfg
        m = METHODS[q.method] if q else None
        row = {"setting": r.label, "method": q.method if q else "none", "bits": m.bits(q) if q else 32,
               "act_bits": m.act_bits(q) if q else None, "group_size": m.group_size(q) if q else None,
               "calib_samples": q.calibration_samples if q and m.calibrated else None, "gen_batch": gen_batch}
        missing = missing_requirements(q.method) if q else []
        if missing:
            row["note"] = "cannot run on this machine: missing " + "; ".join(missing)
            log(json.dumps(row))
            out.append(row)
            continue
        model_dir = Path(work_dir) / "models" / r.label.replace(" ", "_").replace("=", "")
        try:
            if q is None:
                path, row["size_mb"], row["quant_wall_s"], row["quant_cpu_s"] = src, _size_mb(Path(src)), 0.0, 0.0
            else:
                res = _in_fresh_process(_quantize_child, q, src, list(calib), str(model_dir), threads)
                path, row["size_mb"] = res["model_dir"], round(res["size_mb"], 1)
                row["quant_wall_s"], row["quant_cpu_s"] = res["wall_s"], res["cpu_s"]
            row.update(_in_fresh_process(_measure_child, path, sets, threads, gen_tokens, gen_batch))
        except Exception as e:  # noqa: BLE001 - a failed row is reported and the others still run
            row["note"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:240]}"
        finally:
            if not keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
        row["load_avg_1m"] = round(os.getloadavg()[0], 2)
        log(json.dumps(row))
        out.append(row)
        with open(Path(work_dir) / PARTIAL, "a") as f:  # survives an interrupted report
            f.write(json.dumps(row) + "\n")
    return out


# ---- outputs --------------------------------------------------------------------------------------------

def _fmt(v, key: str) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if key.endswith("_acc") else str(v)


def markdown(rows: Sequence[dict], header: str = "") -> str:
    cols = ["setting", "mmlu_stem_acc", "arc_easy_acc", "size_mb", "peak_mem_mb", "tok_s_b1", "tok_s_bN",
            "quant_wall_s", "quant_cpu_s", "load_avg_1m", "note"]
    names = ["setting", "MMLU-STEM acc", "ARC-Easy acc", "size MB", "peak mem MB", "tok/s b1",
             f"tok/s b{rows[0].get('gen_batch', 'N') if rows else 'N'}", "quant wall s", "quant CPU s", "load 1m",
             "note"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [_fmt(r.get(c), c) for c in cols]
        if r.get("peak_mem_mb") is not None:
            cells[4] += f" ({r.get('mem_kind', '')})"
        lines.append("| " + " | ".join(cells) + " |")
    study = sorted((r for r in rows if r.get("method") == "gptq" and r.get("bits") == 4 and "mmlu_stem_acc" in r),
                   key=lambda r: r["calib_samples"])
    text = (header + "\n\n" if header else "") + "\n".join(lines)
    if len(study) > 1:
        text += ("\n\nCalibration-size study (gptq W4, samples drawn from the SFT data):\n\n"
                 "| calibration samples | MMLU-STEM acc | ARC-Easy acc | quant wall s |\n|---|---|---|---|\n")
        text += "\n".join(f"| {r['calib_samples']} | {r['mmlu_stem_acc']:.3f} | {r['arc_easy_acc']:.3f} | "
                          f"{r['quant_wall_s']} |" for r in study)
    return text + "\n"


def figure(rows: Sequence[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("peak_mem_mb") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    top = max((r["tok_s_bN"] for r in ok), default=1) or 1
    for i, r in enumerate(ok):
        acc = (r["mmlu_stem_acc"] + r["arc_easy_acc"]) / 2
        ax.scatter(r["peak_mem_mb"], acc, s=30 + 600 * r["tok_s_bN"] / top, alpha=0.55, color=f"C{i % 10}",
                   edgecolors="black", linewidths=0.5)
        # staggered label offsets so rows at the same point (same memory and accuracy) stay readable
        ax.annotate(r["setting"], (r["peak_mem_mb"], acc), fontsize=7, xytext=(6, 4 + 10 * (i % 5)),
                    textcoords="offset points", arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5))
    kind = ok[0]["mem_kind"] if ok else "RSS"
    batch = ok[0]["gen_batch"] if ok else "N"
    ax.set_xlabel(f"peak memory during evaluation (MB, {kind})")
    ax.set_ylabel("mean accuracy (MMLU-STEM slice, ARC-Easy)")
    ax.set_title(f"{title}\nmarker size ∝ generation tokens/s at batch {batch}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: Sequence[dict], out_dir: Path, header: str, title: str) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "quant_report.csv", "md": out_dir / "quant_report.md",
             "json": out_dir / "quant_report.json", "png": out_dir / "quant_tradeoff.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(markdown(rows, header))
    paths["json"].write_text(json.dumps(list(rows), indent=2))
    figure(rows, paths["png"], title)
    return {k: str(v) for k, v in paths.items()}


def report(model: str, out_dir: Path, names: Sequence[str] = DEFAULT_SETTINGS, n_mmlu: int = 100,
           n_arc: int = 100, calib: Optional[Sequence] = None, calib_samples: int = 200,
           calib_study: Sequence[int] = (), group_size: int = 64, qat_steps: Optional[int] = None,
           threads: int = 2, gen_tokens: int = 32, gen_batch: int = 8, keep_models: bool = False,
           command: str = "", log=print, full_precision: bool = True, resume: bool = False) -> dict:
    """Build the rows, measure them, write the CSV / markdown / JSON / PNG; returns {"rows", "paths"}."""
    from stemqa.data.mcq import load_file
    from stemqa.data.paths import data_root

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = settings(names, group_size, calib_samples, calib_study, qat_steps, threads, full_precision)
    if calib is None:  # the demo SFT source (ARC-Easy train), all 2251 questions so |C| = 2000 is possible
        calib, _ = load_file(data_root() / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", subject="science")
    sets = load_eval_sets(n_mmlu, n_arc)
    t0 = time.perf_counter()
    measured = measure_rows(model, rows, sets, calib, Path(out_dir), threads, gen_tokens, gen_batch, keep_models, log,
                            resume)
    header = (f"Model `{model}`; {len(sets['mmlu_stem'])} MMLU-STEM + {len(sets['arc_easy'])} ARC-Easy questions "
              f"(letter scoring, 0-shot); generation {gen_tokens} new tokens greedy; {time.strftime('%Y-%m-%d')}, "
              f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} torch threads; total {time.perf_counter() - t0:.0f} s"
              f"{' (rows kept by --resume not counted)' if resume else ''}."
              + (f"\n\nCommand: `{command}`" if command else ""))
    paths = write_outputs(measured, Path(out_dir), header, f"Quantization trade-off, {model}")
    return {"rows": measured, "paths": paths}
