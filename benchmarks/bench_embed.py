"""Embedding speed: Ray Data (stemqa.embed) vs single-process sentence-transformers on the same texts.

    .venv/bin/python benchmarks/bench_embed.py [--n 20000] [--actors 2] [--cpus-per-actor 0.5] [--two-node]

Texts: real MCQ question stems (MMLU, ARC, QASC, AI2 science) then OpenStax paragraphs, each cut to 300
characters, repeated to `--n`. Each measurement runs in its own Python process, so one's Ray instance,
threads and CPU accounting do not leak into the next:
- single: the model encodes the texts in one process with torch's default threads, after a warm-up.
- ray 1 node: stemqa.embed's Ray Data job (ActorPoolStrategy) on a private local Ray with this machine's CPUs.
  start-up = time to the first batch (actor start, model load, first batch); steady = the rows after the first
  batch over the time after it; end to end includes start-up.
- ray 2 nodes (--two-node): the same job on a two-node cluster of cluster/local.sh, started here on ports of
  its own (STEMQA_RAY_PORT 6520, dashboard 8386, a fresh temp dir) with `--two-node-cpus` per node and
  `--actors` actors per node, and stopped afterwards. On one machine both "nodes" share the same cores.
CPU seconds: the measuring process, plus for Ray every process of its Ray instance (workers, raylets, GCS),
sampled with psutil every 0.5 s. The vectors of each Ray run are checked against the single-process ones.
Prints a JSON summary and updates the "Embedding: Ray Data vs single process" section of BENCHMARKS.md.
Timings on a shared machine are noisy: compare within a run, and prefer the CPU-second figures.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
OUT = ROOT / "benchmarks" / "out" / "embed"
SECTION = "## Embedding: Ray Data vs single process"
MAX_CHARS = 300


def bench_texts(root: Path, n: int) -> list[str]:
    texts = []
    for f in sorted(glob.glob(str(root / "mcq" / "mmlu" / "test" / "*.csv"))):
        with open(f, newline="", encoding="utf-8") as fh:
            texts += [row[0] for row in csv.reader(fh) if row]
    for f in sorted(glob.glob(str(root / "mcq" / "**" / "*.jsonl"), recursive=True)):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                q = json.loads(line).get("question")
                if isinstance(q, dict) and q.get("stem"):
                    texts.append(q["stem"])
    for f in sorted(glob.glob(str(root / "corpus" / "*.jsonl"))):
        with open(f, encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    texts = [t.strip()[:MAX_CHARS] for t in texts if t.strip()]
    return (texts * (n // len(texts) + 1))[:n]


class CpuMeter:
    """CPU seconds (user + system) used by a set of processes since start(), polled in a thread.

    Processes that end between two polls lose at most one poll interval of CPU time; Ray's actors live until
    the dataset is consumed, so this undercounts by a fraction of a second per process."""

    def __init__(self, find_pids, interval: float = 0.5):
        import psutil

        self.psutil, self.find_pids, self.interval = psutil, find_pids, interval
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()

    def _cpu(self, pid):
        try:
            proc = self.psutil.Process(pid)
            t = proc.cpu_times()
            if pid not in self.names:
                self.names[pid] = proc.name()
            return t.user + t.system
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            return None

    def _poll(self, first=False):
        for pid in self.find_pids():
            c = self._cpu(pid)
            if c is None:
                continue
            if first:
                self.base[pid] = c
            self.last[pid] = c

    def start(self):
        self._poll(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self._poll()

    def stop(self) -> float:
        self._poll()
        self._stop.set()
        self._thread.join()
        return sum(c - self.base.get(pid, 0.0) for pid, c in self.last.items())

    def by_name(self) -> dict[str, float]:
        """CPU seconds per process name (ray::MapWorker..., raylet, gcs_server, ...), largest first."""
        out: dict[str, float] = {}
        for pid, c in self.last.items():
            name = self.names.get(pid, "?")
            out[name] = out.get(name, 0.0) + c - self.base.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def _descendants():
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def _cluster_pids(cluster_dir: str):
    import psutil

    def find():
        roots = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(cluster_dir in part for part in (p.info["cmdline"] or [])):
                    roots.append(p)
            except psutil.Error:
                continue
        pids = set()
        for r in roots:
            pids.add(r.pid)
            try:
                pids.update(c.pid for c in r.children(recursive=True))
            except psutil.Error:
                pass
        return list(pids)

    return find


# --- the measurements (each in its own process) -----------------------------------------------------------
def measure_single(args) -> dict:
    import numpy as np
    import torch

    from stemqa.data.paths import data_root
    from stemqa.models import load_embedder

    texts = bench_texts(data_root(), args.n)
    model = load_embedder("all-MiniLM-L6-v2")
    model.encode(texts[:args.batch_size], batch_size=args.batch_size)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    vectors = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(OUT / "single.npy", vectors.astype(np.float32))
    return {"texts": len(texts), "wall_s": wall, "texts_per_s": len(texts) / wall, "cpu_s": cpu,
            "torch_threads": torch.get_num_threads()}


def measure_ray(args) -> dict:
    import numpy as np

    from stemqa.config.schema import EmbedConfig
    from stemqa.data.paths import data_root
    from stemqa.embed import embedding_dataset
    from stemqa.ray_utils import init_ray

    texts = bench_texts(data_root(), args.n)
    t_init = time.perf_counter()
    if args.address:
        init_ray(args.address)
        meter_pids = _cluster_pids(args.cluster_dir)
    else:
        init_ray("local", num_cpus=os.cpu_count())
        meter_pids = _descendants
    import ray

    init_s = time.perf_counter() - t_init
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.actors, cpus_per_actor=args.cpus_per_actor)
    meter = CpuMeter(meter_pids).start()
    t0, c0 = time.perf_counter(), time.process_time()
    first_at, first_rows, rows, parts = None, 0, 0, []
    for batch in embedding_dataset(texts, cfg).iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["idx"])
        parts.append((batch["idx"], batch["embedding"]))
        if first_at is None:
            first_at, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    driver_cpu, ray_cpu = time.process_time() - c0, meter.stop()
    idx = np.concatenate([i for i, _ in parts])
    vecs = np.concatenate([v for _, v in parts])[np.argsort(idx, kind="stable")]
    single = np.load(OUT / "single.npy") if (OUT / "single.npy").exists() else None
    max_diff = float(np.abs(vecs - single).max()) if single is not None and single.shape == vecs.shape else None
    return {"texts": rows, "nodes": nodes, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
            "ray_init_s": init_s, "startup_s": first_at - t0, "first_rows": first_rows,
            "steady_texts_per_s": (rows - first_rows) / max(end - first_at, 1e-9),
            "e2e_texts_per_s": rows / (end - t0), "wall_s": end - t0, "cpu_s": driver_cpu + ray_cpu,
            "driver_cpu_s": driver_cpu, "cpu_by_process": meter.by_name(), "max_abs_diff_vs_single": max_diff, "complete": bool((np.sort(idx) == np.arange(len(texts))).all())}


def _child(mode: str, args, extra: list[str] = (), env=None) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--n", str(args.n), "--batch-size", str(args.batch_size),
           "--cpus-per-actor", str(args.cpus_per_actor), *extra]
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_before"], result["load_after"] = round(load, 1), round(os.getloadavg()[0], 1)
    print(mode, json.dumps(result), flush=True)
    return result


def two_node(args) -> dict:
    """Start a private two-node cluster with cluster/local.sh, measure on it, stop it (only its own processes)."""
    cluster_dir = tempfile.mkdtemp(prefix="sqh4", dir="/tmp")  # short: Ray's socket paths are capped at 107 bytes
    env = dict(os.environ, STEMQA_CLUSTER_DIR=cluster_dir, STEMQA_RAY_PORT=str(args.port),
               STEMQA_DASHBOARD_PORT=str(args.dashboard_port), STEMQA_HEAD_CPUS=str(args.two_node_cpus),
               STEMQA_WORKER_CPUS=str(args.two_node_cpus), RAY=str(Path(sys.executable).parent / "ray"))
    env.pop("RAY_ADDRESS", None)
    script = str(ROOT / "cluster" / "local.sh")
    try:
        t = time.perf_counter()
        started = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=900)
        if started.returncode != 0:
            raise RuntimeError(f"cluster/local.sh start failed: {started.stderr[-2000:]}")
        start_s = time.perf_counter() - t
        address = started.stdout.strip().splitlines()[-1]
        from stemqa.ray_utils import read_env_file

        env.update(read_env_file(Path(cluster_dir) / "env"))  # the cluster's token auth, for the child's ray.init
        result = _child("ray", argparse.Namespace(**{**vars(args), "actors": 2 * args.actors}),
                        ["--actors", str(2 * args.actors), "--address", address, "--cluster-dir", cluster_dir],
                        env=env)
        result["cluster_start_s"] = start_s
        result["cpus_per_node"] = args.two_node_cpus
        return result
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=300)


def update_markdown(summary: dict, command: str) -> None:
    s, r1, r2 = summary["single"], summary["ray_1node"], summary.get("ray_2node")
    per_k = lambda r: 1000 * r["cpu_s"] / r["texts"]
    rows = [
        f"| single process ({s['torch_threads']} torch threads) | {s['texts_per_s']:.1f} | - | - | "
        f"{s['texts_per_s']:.1f} | 1.00 | {per_k(s):.2f} | {s['load_before']}/{s['load_after']} |",
        f"| Ray Data, 1 node ({r1['actors']} actors x {r1['cpus_per_actor']} CPU) | {r1['steady_texts_per_s']:.1f} | "
        f"{r1['startup_s']:.1f} | {r1['e2e_texts_per_s']:.1f} | {r1['steady_texts_per_s']:.1f} | "
        f"{r1['steady_texts_per_s'] / s['texts_per_s']:.2f} | {per_k(r1):.2f} | {r1['load_before']}/{r1['load_after']} |",
    ]
    if r2:
        rows.append(
            f"| Ray Data, 2 nodes ({r2['actors']} actors x {r2['cpus_per_actor']} CPU, {r2['cpus_per_node']} CPUs "
            f"per node) | {r2['steady_texts_per_s']:.1f} | {r2['startup_s']:.1f} | {r2['e2e_texts_per_s']:.1f} | "
            f"{r2['steady_texts_per_s']:.1f} | {r2['steady_texts_per_s'] / s['texts_per_s']:.2f} (x"
            f"{r2['steady_texts_per_s'] / r1['steady_texts_per_s']:.2f} over 1 node) | {per_k(r2):.2f} | "
            f"{r2['load_before']}/{r2['load_after']} |")
    table = "\n".join(["| run | texts/s | start-up s (to 1st batch) | end-to-end texts/s | steady texts/s "
                       "| steady / single | CPU s per 1k texts | load avg before/after |",
                       "|---|---|---|---|---|---|---|---|", *rows])
    body = (f"{SECTION}\n\nCommand: `{command}` ({summary['date']}, {summary['machine']}).\n\n"
            f"{summary['texts']} texts (MCQ question stems, then OpenStax paragraphs, cut to {MAX_CHARS} characters), "
            f"all-MiniLM-L6-v2, batch {summary['batch_size']}. Each row runs in its own process, one after the other. "
            "Steady = rows after the first batch over the time after it (actors up); start-up = time to the first "
            "batch. CPU s: the measuring process plus every process of its Ray instance. Ray's vectors, put back in "
            f"input order by their idx, equal the single-process ones (max abs diff "
            f"{r1['max_abs_diff_vs_single']:.1e}).\n\n"
            f"{table}\n\n{summary.get('notes', '')}".rstrip() + "\n")
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
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--actors", type=int, default=2, help="actors on one node (two-node runs use this many per node)")
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--two-node", action="store_true", help="also measure on a private two-node cluster/local.sh")
    p.add_argument("--two-node-cpus", type=int, default=os.cpu_count(), help="CPUs each of the two nodes declares")
    p.add_argument("--port", type=int, default=6520)
    p.add_argument("--dashboard-port", type=int, default=8386)
    p.add_argument("--reuse-one-node", action="store_true",
                   help="take the single-process and 1-node figures from the last summary.json; measure 2 nodes")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--measure", choices=["single", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--cluster-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_single(args) if args.measure == "single" else measure_ray(args)))
        return 0

    # SIGTERM (timeout, kill) must still run two_node's `finally`, which stops the private cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary = {"date": time.strftime("%Y-%m-%d"), "texts": args.n, "batch_size": args.batch_size,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if args.reuse_one_node:  # the single-process and 1-node rows of the last run (same --n), e.g. after a failure
        last = json.loads((OUT / "summary.json").read_text())
        if last["texts"] != args.n:
            raise SystemExit(f"--reuse-one-node: the last run embedded {last['texts']} texts, not {args.n}")
        summary.update(single=last["single"], ray_1node=last["ray_1node"], date=last["date"])
    else:
        summary["single"] = _child("single", args)
        summary["ray_1node"] = _child("ray", args, ["--actors", str(args.actors)])
    if args.two_node:
        summary["ray_2node"] = two_node(args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not args.no_markdown:
        cmd = "python benchmarks/bench_embed.py" + " ".join(
            [""] + [a for a in (argv if argv is not None else sys.argv[1:])])
        update_markdown(summary, cmd.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
