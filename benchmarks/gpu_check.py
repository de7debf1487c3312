"""The GPU checks of one single-GPU machine: SFT and DPO (bf16, 1 GPU, NCCL, ZeRO-2), a 4-bit model's generation
with bitsandbytes' CUDA kernels, and faiss-gpu search; tokens/s, MFU and peak memory per step.

    bash benchmarks/gpu_check.sh             # on a GPU machine (installs the CUDA torch wheel and the gpu extra)
    bash benchmarks/gpu_check.sh --dry-run   # on CPU: the same code paths on tiny-qwen3, a few steps (CI runs it)

SFT and DPO go through the pipeline's own entry points (`stemqa sft` / `stemqa dpo`, Ray Train + DeepSpeed), so
what is checked is what the `qwen3-0.6b` preset runs on a cluster. MFU = achieved training FLOP/s over the GPU's
peak dense bf16 FLOP/s, with 6 x parameters FLOPs per trained token (forward + backward; attention's own FLOPs and
DPO's precomputed reference pass not counted). Peak memory per step: `torch.cuda.max_memory_allocated`, reset
every step (stemqa.train.common.peak_memory_mb). Prints a JSON summary; writes nothing to BENCHMARKS.md
(`--write` adds the GPU section from this run's numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# dense bf16 peak of the GPU (vendor datasheets, without sparsity), TFLOP/s; matched on torch's device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
SECTION = "## GPU check"


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def stemqa(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "stemqa.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stemqa {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.rfind("\n{") + 1:])


def n_params(model_dir: str) -> int:
    from stemqa.models import load_causal_lm

    return sum(p.numel() for p in load_causal_lm(model_dir, device="cpu").parameters())


def steps_table(history: Path, params: int, peak: float | None) -> list[dict]:
    from stemqa.train.history import TrainHistory

    rows = []
    for s in TrainHistory.read(history).steps:
        tps = s.tokens / s.seconds
        rows.append({"step": s.step, "tokens": s.tokens, "seconds": round(s.seconds, 3), "tokens_per_s": round(tps, 1),
                     "mfu": None if peak is None else round(6 * params * tps / (peak * 1e12), 4),
                     "peak_mem_mb": s.peak_mem_mb})
    return rows


def train_checks(a, work: Path, model: str, gpu: bool) -> dict:
    res = ["--set", f"{{stage}}.resources.use_gpu={'true' if gpu else 'false'}",
           "--set", "{stage}.resources.num_workers=1", "--set", "{stage}.resources.zero_stage=2",
           "--set", f"{{stage}}.resources.bf16={'true' if gpu else 'false'}",
           "--set", f"{{stage}}.resources.cpus_per_worker={a.cpus}"]
    out = {}
    params = n_params(model)
    peak = peak_tflops(device_name(), a.peak_tflops) if gpu else a.peak_tflops
    for stage, extra in (("sft", ["--set", f"sft.max_steps={a.steps}", "--set", f"sft.batch_size={a.batch}",
                                  "--set", "sft.packing=true", "--set", f"sft.checkpoint_every={a.steps}"]),
                         ("dpo", ["--prepare", "--set", f"dpo.max_steps={a.steps}", "--set", f"dpo.batch_size={a.batch}",
                                  "--set", f"dpo.eval_every={a.steps}", "--set", f"dpo.checkpoint_every={a.steps}",
                                  "--set", f"dpo.ref_cpus={a.cpus}",
                                  *(["--set", "dpo.split_sizes=[8,4,4]"] if a.dry_run else [])])):
        t0 = time.perf_counter()
        d = work / stage
        result = stemqa([stage, "--config", "demo", "--model", model, "--out", str(d), *extra,
                         *[x.format(stage=stage) for x in res]])
        rows = steps_table(d / "history.jsonl", params, peak)
        out[stage] = {"wall_s": round(time.perf_counter() - t0, 1), "steps": rows,
                      "tokens_per_s": result["metrics"].get("tokens_per_s"),
                      "median_mfu": sorted(r["mfu"] for r in rows)[len(rows) // 2] if peak else None,
                      "max_peak_mem_mb": max((r["peak_mem_mb"] or 0) for r in rows)}
        for r in rows:
            print(f"[{stage}] step {r['step']}: {r['tokens']} tokens in {r['seconds']} s, {r['tokens_per_s']} tokens/s, "
                  f"MFU {r['mfu'] if r['mfu'] is not None else 'n/a (no peak for this device)'}, "
                  f"peak memory {r['peak_mem_mb']} MiB", flush=True)
    return out


def quant_generation(a, work: Path, model: str) -> dict:
    """bitsandbytes 4-bit (nf4, bf16 compute on GPU) through the quant stage's own method, then batched greedy
    generation: tokens/s and peak memory."""
    import torch

    from stemqa.models import load_tokenizer
    from stemqa.quant.methods import bnb_4bit

    qmodel = bnb_4bit(None, Path(model), (), work / "bnb4")
    tok = load_tokenizer(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [f"Question {i}: why does ice float on water?\nAnswer:" for i in range(a.batch)]
    enc = tok(prompts, return_tensors="pt", padding=True).to(qmodel.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        qmodel.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        t0 = time.perf_counter()
        out = qmodel.generate(**enc, max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        s = time.perf_counter() - t0
    new = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    linear = type(next(m for m in qmodel.modules() if "Linear4bit" in type(m).__name__)).__name__
    return {"layer": linear, "device": str(qmodel.device), "batch": a.batch, "new_tokens": int(new),
            "tokens_per_s": round(new / s, 1),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def faiss_search(a) -> dict:
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((a.vectors, 384), dtype=np.float32)
    xq = rng.standard_normal((1000, 384), dtype=np.float32)
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    index = faiss.IndexFlatIP(384)
    on_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if on_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(xb)
    index.search(xq[:10], 5)  # warm-up
    t0 = time.perf_counter()
    _, ids = index.search(xq, 5)
    s = time.perf_counter() - t0
    # the exact answer for a few queries, from numpy
    exact = np.argsort(-(xq[:5] @ xb.T), axis=1)[:, :5]
    return {"gpu": on_gpu, "vectors": a.vectors, "queries": len(xq), "queries_per_s": round(len(xq) / s, 1),
            "top5_matches_exact": bool((np.sort(exact, 1) == np.sort(ids[:5], 1)).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny-qwen3, a few steps: the code paths, no figures")
    p.add_argument("--model", default=None, help="default: smollm2-135m-instruct (tiny-qwen3 with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (default 30; dry run 2)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch / generation batch (default 16; dry run 2)")
    p.add_argument("--cpus", type=float, default=None, help="CPUs of the Train worker (default 4; dry run 1)")
    p.add_argument("--gen-tokens", type=int, default=None, help="tokens generated per sequence (default 64)")
    p.add_argument("--vectors", type=int, default=None, help="FAISS vectors (default 200000; dry run 2000)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    p.add_argument("--write", action="store_true", help="add this run's figures to BENCHMARKS.md")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.model = a.model or ("tiny-qwen3" if dry else "smollm2-135m-instruct")
    a.steps, a.batch = a.steps or (2 if dry else 30), a.batch or (2 if dry else 16)
    a.cpus, a.gen_tokens = a.cpus or (1 if dry else 4), a.gen_tokens or (8 if dry else 64)
    a.vectors = a.vectors or (2000 if dry else 200_000)

    import torch

    from stemqa.models import resolve_model

    gpu = torch.cuda.is_available()
    if not gpu and not dry:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    model = str(resolve_model(a.model))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        summary = {"device": device_name(), "dry_run": dry, "torch": torch.__version__, "model": a.model,
                   "train": train_checks(a, work, model, gpu), "quant_generation": quant_generation(a, work, model),
                   "faiss": faiss_search(a)}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=1))
    if a.write and not dry:
        write_section(summary, " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


def write_section(s: dict, args: str) -> None:
    tr = s["train"]
    lines = [SECTION, "", f"Command: `bash benchmarks/gpu_check.sh {args}` ({date.today()}, {s['device']}, torch "
             f"{s['torch']}, {s['wall_s'] / 60:.1f} min).", "",
             "| check | tokens/s | median MFU | max peak memory MiB |", "|---|---|---|---|"]
    for stage in ("sft", "dpo"):
        lines.append(f"| {stage} (bf16, ZeRO-2, 1 GPU) | {tr[stage]['tokens_per_s']:.0f} | {tr[stage]['median_mfu']} | "
                     f"{tr[stage]['max_peak_mem_mb']} |")
    q, f = s["quant_generation"], s["faiss"]
    lines.append(f"| 4-bit generation ({q['layer']}, batch {q['batch']}) | {q['tokens_per_s']} | - | {q['peak_mem_mb']} |")
    lines += ["", f"- FAISS flat search on {'the GPU' if f['gpu'] else 'the CPU'}: {f['queries_per_s']} queries/s over "
              f"{f['vectors']} vectors; top-5 equal to the exact answer: {f['top5_matches_exact']}.", ""]
    from mdsection import replace_section

    replace_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
