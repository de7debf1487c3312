"""FAISS index build time and top-5 query latency (p50/p99): the demo corpus and 1M synthetic vectors.

    .venv/bin/python benchmarks/bench_index.py [--synthetic 1000000] [--kinds flat ivf hnsw] [--hnsw-n 1000000]

Indexes are made by `stemqa.rag.index.make_faiss_index` with the RagConfig defaults (ivf: nlist about
4*sqrt(n), nprobe 16; hnsw: M 32, efSearch 64), as `stemqa rag build` makes them.
- demo corpus: the vectors of the demo preset's index (benchmarks/out/rag/demo_index, built by
  `stemqa rag build --config demo` or bench_rag.py), read back from its flat index; queries are real MCQ
  questions. Also timed: one query end to end through `Retriever.search` (embedding the question + search).
- synthetic: `--synthetic` random 384-d unit vectors (float32); queries are other random unit vectors.
(`--ivf-nlist` sets the synthetic set's cells, as rag.ivf_nlist would.)
Latency: one query at a time (as a server sees them), `--queries` of them, after 10 warm-up queries; recall@5 =
share of the exact top 5 (flat) that the approximate index returns. IVF on more than `--ivf-train` vectors is
trained on a random sample of that size (FAISS's own k-means caps at 256 points per cell anyway).
Updates the "FAISS index: build and query latency" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
OUT = ROOT / "benchmarks" / "out" / "index"
SECTION = "## FAISS index: build and query latency"


def latencies(fn, queries: np.ndarray, warmup: int = 10) -> dict:
    for q in queries[:warmup]:
        fn(q[None, :])
    lat = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None, :])
        lat.append(time.perf_counter() - t)
    return {"p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "queries": len(lat)}


def bench_kind(kind: str, vectors: np.ndarray, queries: np.ndarray, exact_ids, ivf_train: int, ivf_nlist=None,
               k: int = 5) -> dict:
    import faiss

    from stemqa.config.schema import RagConfig
    from stemqa.rag.index import make_faiss_index

    rag = RagConfig(ivf_nlist=ivf_nlist)
    load, t, c = os.getloadavg()[0], time.perf_counter(), time.process_time()
    if kind == "ivf" and len(vectors) > ivf_train:
        # train on a sample, add everything: the same index make_faiss_index makes, without a 1M-point k-means
        nlist = rag.ivf_nlist or max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))
        sample = vectors[np.random.default_rng(0).choice(len(vectors), ivf_train, replace=False)]
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.add(vectors)
    else:
        index = make_faiss_index(vectors, kind, "cosine", rag.ivf_nlist, rag.hnsw_m)
    build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
    if kind == "ivf":
        index.nprobe = rag.ivf_nprobe
    if kind == "hnsw":
        index.hnsw.efSearch = rag.hnsw_ef_search
    out = {"kind": kind, "n": len(vectors), "build_s": build_s, "build_cpu_s": build_cpu, "load": round(load, 1),
           **latencies(lambda q: index.search(q, k), queries)}
    if kind == "ivf":
        out["nlist"], out["nprobe"] = index.nlist, index.nprobe
    _, ids = index.search(queries, k)
    if exact_ids is not None:
        out["recall@5"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))
    return out, ids


def bench_set(name: str, vectors: np.ndarray, queries: np.ndarray, kinds, ivf_train: int, hnsw_n=None,
              ivf_nlist=None) -> list:
    rows, exact = [], None
    for kind in kinds:
        v = vectors if kind != "hnsw" or not hnsw_n or hnsw_n >= len(vectors) else vectors[:hnsw_n]
        truth = exact
        if len(v) != len(vectors):  # a subset (--hnsw-n): its own exact top 5, by brute force
            truth = np.argsort(-(queries @ v.T), axis=1)[:, :5]
        row, ids = bench_kind(kind, v, queries, truth, ivf_train, ivf_nlist)
        if kind == "flat":
            exact = ids
        row["set"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def synthetic_set(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random unit vectors (float32) and `n_queries` other random unit vectors, from one seeded generator."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, queries


def demo_queries(root: Path, n: int) -> list[str]:
    from stemqa.data.mcq import load_file

    recs = load_file(root / "mcq" / "arc" / "ARC-Easy-test.jsonl", "arc_jsonl", limit=n)[0]
    return [r.question for r in recs]


def update_markdown(result: dict, command: str) -> None:
    lines = ["| set | vectors | index | build s (CPU s) | p50 ms | p99 ms | recall@5 vs flat | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kind = r["kind"] + (f" (nlist {r['nlist']}, nprobe {r['nprobe']})" if r["kind"] == "ivf" else "")
        kind += " (M 32, efSearch 64)" if r["kind"] == "hnsw" else ""
        rec = f"{r['recall@5']:.3f}" if "recall@5" in r else ("exact" if r["kind"] == "flat" else "-")
        lines.append(f"| {r['set']} | {r['n']:,} | {kind} | {r['build_s']:.2f} ({r['build_cpu_s']:.1f}) | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {rec} | {r['load']} |")
    e2e = result.get("retriever")
    extra = ""
    if e2e:
        extra = (f"\n\nDemo index end to end (`Retriever.search([question], 5)`: embed the question with "
                 f"all-MiniLM-L6-v2 in process + flat search, one at a time): p50 {e2e['p50_ms']:.1f} ms, p99 "
                 f"{e2e['p99_ms']:.1f} ms over {e2e['queries']} ARC questions (load avg {e2e['load']}). "
                 f"Whole demo index build (`stemqa rag build`: chunking, Ray Data embedding of "
                 f"{result['demo_chunks']} chunks, near-dup removal, FAISS, files) took "
                 f"{result['demo_build_seconds']:.0f} s in the run that built it (its manifest's build_seconds; that "
                 f"run's load was not recorded).")
    body = (f"{SECTION}\n\nCommand: `{command}` ({result['date']}, {result['machine']}).\n\n"
            "One top-5 query at a time, after 10 warm-up queries; recall@5 = share of the exact (flat) top 5 found. "
            "Synthetic vectors are random unit vectors, the hardest case for IVF/HNSW (no cluster structure); real "
            "embeddings cluster, so recall there is higher at the same settings. Build CPU s: this process's; below "
            "the wall time when it waited for a core on the busy machine, above it when FAISS used both cores.\n\n" + "\n".join(lines) + extra + "\n"
            + (f"\n{result['notes']}\n" if result.get("notes") else ""))
    text = BENCH_MD.read_text()
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        _, nxt, tail = rest.partition("\n## ")
        text = head + body + (("\n## " + tail) if nxt else "")
    else:
        text = text.rstrip() + "\n\n" + body
    BENCH_MD.write_text(text)


def main(argv=None) -> int:
    import faiss

    from stemqa.data.paths import data_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    p.add_argument("--hnsw-n", type=int, default=None, help="HNSW on only the first N synthetic vectors")
    p.add_argument("--ivf-train", type=int, default=100_000)
    p.add_argument("--ivf-nlist", type=int, default=None, help="IVF cells for the synthetic set (default: rag.ivf_nlist's rule)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--index", default=str(ROOT / "benchmarks" / "out" / "rag" / "demo_index"))
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args(argv)
    rows, result = [], {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                                      f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads"}
    index_dir = Path(args.index)
    if (index_dir / "manifest.json").exists():
        from stemqa.rag import Retriever

        retriever = Retriever.load(index_dir)
        flat = retriever.index
        vectors = flat.reconstruct_n(0, flat.ntotal) if hasattr(flat, "reconstruct_n") else None
        questions = demo_queries(data_root(), args.queries)
        qvecs = np.ascontiguousarray(retriever.model.encode(questions, normalize_embeddings=True), dtype=np.float32)
        rows += bench_set("demo corpus", np.ascontiguousarray(vectors, dtype=np.float32), qvecs, args.kinds,
                          args.ivf_train)
        load = round(os.getloadavg()[0], 1)
        lat = []
        for q in questions[:10]:
            retriever.search([q], 5)
        for q in questions:
            t = time.perf_counter()
            retriever.search([q], 5)
            lat.append(time.perf_counter() - t)
        result["retriever"] = {"p50_ms": 1000 * float(np.percentile(lat, 50)), "load": load,
                               "p99_ms": 1000 * float(np.percentile(lat, 99)), "queries": len(lat)}
        manifest = json.loads((index_dir / "manifest.json").read_text())
        result["demo_chunks"], result["demo_build_seconds"] = manifest["counts"]["chunks"], manifest["build_seconds"]
    else:
        print(f"{index_dir}: no demo index (run benchmarks/bench_rag.py accuracy first); synthetic only", flush=True)
    if args.synthetic:
        synth, queries = synthetic_set(args.synthetic, args.dim, args.queries)
        rows += bench_set("synthetic", synth, queries, args.kinds, args.ivf_train, args.hnsw_n, args.ivf_nlist)
    result["rows"] = rows
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(result, indent=2))
    if not args.no_markdown:
        cmd = "python benchmarks/bench_index.py" + "".join(" " + a for a in (argv if argv is not None else sys.argv[1:]))
        update_markdown(result, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
