"""Serve throughput and latency: /v1/mcqa with batching on vs off, RAG on vs off, full-precision vs quantized
model; tokens/s of /v1/completions generation.

    python benchmarks/bench_serve.py --model smollm2-135m-instruct [--quant-model DIR] [--index DIR]
        [--requests 64] [--concurrency 16] [--port 8127] [--out benchmarks/out/serve.json]

Each configuration is deployed in turn (one scorer replica, so batching is compared on equal resources) and
hit by `--concurrency` client coroutines sending `--requests` real grade-8 science questions over HTTP. Ratios
between rows measured in one run are what to read; absolute numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from stemqa.config import load_config
from stemqa.data.paths import SAMPLE_DATA

ROOT = Path(__file__).resolve().parents[1]


def questions(n: int) -> list[dict]:
    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_sources

    # short grade-8 science questions (AI2): long MMLU prompts make one CPU batch take tens of seconds
    records, _ = load_sources([McqSource(path="mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl",
                                         format="arc_jsonl", subject="science")], SAMPLE_DATA)
    return [{"question": q.question, "choices": q.choices, "subject": q.subject} for q in (records * n)[:n]]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies, errors = [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client):
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/mcqa", json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += r.status_code != 200

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        await client.post(f"{url}/v1/mcqa", json=bodies[0])  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"requests": len(bodies), "errors": errors, "req_per_s": round(len(bodies) / wall, 2),
            "p50_ms": round(statistics.median(latencies), 1), "p99_ms": round(percentile(latencies, 0.99), 1)}


def generation_tokens_per_s(url: str, max_tokens: int = 64, n: int = 3) -> float:
    tokens, wall = 0, 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "prompt": "Newton's second law states that", "max_tokens": max_tokens, "temperature": 0})
        wall += time.perf_counter() - t0
        tokens += r.json()["usage"]["completion_tokens"] or 0
    return round(tokens / wall, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant-model", default=None, help="quantized model directory (e.g. <run>/quant/model)")
    p.add_argument("--index", default=None, help="RAG index directory; without it RAG rows are skipped")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--port", type=int, default=8127)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serve.json"))
    args = p.parse_args(argv)

    from ray import serve

    from jobs.serve import deploy
    from stemqa.ray_utils import init_ray

    init_ray("local", num_cpus=2)
    bodies = questions(args.requests)
    rows = []
    models = [("full", args.model)] + ([("quant", args.quant_model)] if args.quant_model else [])
    for label, model in models:
        for rag in ([False, True] if args.index else [False]):
            for batch in (args.batch_size, 1):
                cfg = load_config("demo", [f"serve.port={args.port}", f"serve.max_batch_size={batch}",
                                           "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                                           "serve.cpus_per_replica=1", "serve.retriever_cpus=0.5"])
                t0 = time.time()
                url = deploy(cfg, model, args.index if rag else None)
                deploy_s = time.time() - t0
                sent = [dict(b, use_rag=rag) for b in bodies]
                res = load(url, sent, args.concurrency)
                row = {"model": label, "rag": rag, "max_batch_size": batch, "deploy_s": round(deploy_s, 1),
                       **asyncio.run(res)}
                if not rag and batch == args.batch_size:
                    row["gen_tokens_per_s"] = generation_tokens_per_s(url)
                print(json.dumps(row), flush=True)
                rows.append(row)
    serve.shutdown()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"concurrency": args.concurrency, "rows": rows}, indent=2))
    print("\n| model | RAG | max_batch_size | req/s | p50 ms | p99 ms | errors | gen tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {'on' if r['rag'] else 'off'} | {r['max_batch_size']} | {r['req_per_s']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r.get('gen_tokens_per_s', '')} |")
    for label, _ in models:
        for rag in ([False, True] if args.index else [False]):
            on = next(r for r in rows if r["model"] == label and r["rag"] == rag and r["max_batch_size"] > 1)
            off = next(r for r in rows if r["model"] == label and r["rag"] == rag and r["max_batch_size"] == 1)
            print(f"{label}, RAG {'on' if rag else 'off'}: batching gives {on['req_per_s'] / off['req_per_s']:.2f}x "
                  f"throughput, p99 {on['p99_ms']:.0f} vs {off['p99_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
