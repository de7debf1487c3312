"""Embedding and index speed: Ray Data vs single-process sentence-transformers; FAISS build and query latency.

    .venv/bin/python benchmarks/bench_embed.py [--n 20000] [--actors 2] [--cpus-per-actor 0.5] [--synthetic 1000000]

Texts are real OpenStax paragraphs (cut to 512 characters). The single-process run encodes them in this
process with torch's default threads, after a warm-up. The Ray Data run is stemqa.embed's job on a private
local Ray; "steady" counts the rows after the first batch arrives (actors up) over the time after it, "end to
end" includes actor start-up. FAISS: IndexFlatIP build time and top-5 single-query latency p50/p99 over the
embedded texts, and over `--synthetic` random unit vectors. Prints a markdown row and updates the
"Embedding and index" section of BENCHMARKS.md. Timings on a shared machine are noisy: compare within a run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
SECTION = "## Embedding and index"


def corpus_texts(root: Path, n: int) -> list[str]:
    texts = []
    for name in ("openstax_university_physics", "openstax_chemistry", "openstax_intro_python"):
        with open(root / "corpus" / f"{name}.jsonl", encoding="utf-8") as f:
            texts += [json.loads(line)["text"][:512] for line in f]
    texts = [t for t in texts if t.strip()]
    return (texts * (n // len(texts) + 1))[:n]


def faiss_latency(vectors: np.ndarray, queries: np.ndarray, k: int = 5) -> dict:
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    build = time.perf_counter() - t0
    lat = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], k)
        lat.append(time.perf_counter() - t)
    return {"build_s": build, "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def update_markdown(row: str, command: str) -> None:
    header = ("| date | texts | single-process texts/s | Ray Data steady texts/s | ratio | Ray end-to-end texts/s "
              "| flat build / p50 / p99 (corpus) | flat build / p50 / p99 (synthetic) | machine, load |\n"
              "|---|---|---|---|---|---|---|---|---|")
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    if SECTION not in text:
        notes = ("Ratio = Ray Data steady-state texts/s over single-process texts/s (goal >= 0.9 on one node). "
                 "Latencies are one top-5 query at a time against an exact IndexFlatIP.")
        text = text.rstrip() + f"\n\n{SECTION}\n\nCommand: `{command}`\n\n{notes}\n\n{header}\n"
    head, _, rest = text.partition(SECTION)
    body, nxt, tail = rest.partition("\n## ")
    BENCH_MD.write_text(head + SECTION + body.rstrip() + "\n" + row + "\n" + (("\n## " + tail) if nxt else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--synthetic", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args(argv)

    from stemqa.config.schema import EmbedConfig
    from stemqa.data.paths import data_root
    from stemqa.embed import embedding_dataset
    from stemqa.models import load_embedder
    from stemqa.ray_utils import init_ray

    texts = corpus_texts(data_root(), args.n)
    model = load_embedder("all-MiniLM-L6-v2")
    model.encode(texts[:64], batch_size=64)  # warm-up
    t = time.perf_counter()
    single = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)
    single_rate = len(texts) / (time.perf_counter() - t)

    init_ray("local", num_cpus=os.cpu_count())
    cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.actors, cpus_per_actor=args.cpus_per_actor)
    t0 = time.perf_counter()
    first_at, first_rows, rows = None, 0, 0
    for batch in embedding_dataset(texts, cfg).iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["idx"])
        if first_at is None:
            first_at, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    ray_e2e = rows / (end - t0)
    ray_steady = (rows - first_rows) / max(end - first_at, 1e-9)

    rng = np.random.default_rng(0)
    corpus = faiss_latency(np.ascontiguousarray(single, dtype=np.float32), single[rng.integers(0, len(single), args.queries)])
    synth = rng.standard_normal((args.synthetic, single.shape[1]), dtype=np.float32)
    synth /= np.linalg.norm(synth, axis=1, keepdims=True)
    synthetic = faiss_latency(synth, synth[rng.integers(0, len(synth), args.queries)])

    fmt = lambda r: f"{r['build_s']:.2f} s / {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms"
    load = os.getloadavg()[0]
    row = (f"| {time.strftime('%Y-%m-%d')} | {len(texts)} | {single_rate:.0f} | {ray_steady:.0f} "
           f"({args.actors}x{args.cpus_per_actor} CPU) | {ray_steady / single_rate:.2f} | {ray_e2e:.0f} | "
           f"{fmt(corpus)} | {fmt(synthetic)} ({args.synthetic:,}) | {platform.machine()}, {os.cpu_count()} CPUs, "
           f"load {load:.1f} |")
    print(row)
    if not args.no_markdown:
        update_markdown(row, "bash benchmarks/run.sh embed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
