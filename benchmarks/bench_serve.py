"""Serve throughput and latency: /v1/mcqa with batching on vs off, RAG on vs off, full-precision vs quantized
model; tokens/s of /v1/completions generation, batching on vs off.

    python benchmarks/bench_serve.py [--model smollm2-135m-instruct] [--quant-method int8-weight | --quant-model DIR]
        [--index DIR] [--requests 48] [--concurrency 32] [--batch-size 16] [--rows full,quant] [--no-rag]
        [--gen-requests 32] [--gen-tokens 32] [--batch-wait-s S] [--port 8127] [--no-write]

Each configuration is deployed in turn on one private Ray instance: one scorer replica with 1 CPU and 1 torch
thread (so batching is compared on equal resources), the retriever and the ingress beside it. `--concurrency`
client coroutines (closed loop: each sends its next request when the last one is answered) send `--requests`
real grade-8 science questions over HTTP, after a warm-up round. Besides wall-clock req/s and p50/p99, the CPU
seconds of the Serve processes (psutil, per role) over the measured phase are recorded: the machine is shared,
so CPU seconds per request are the figure other jobs disturb least. The scorer's own counters (`stats()`) give
the mean number of questions per @serve.batch call and per forward pass, which shows the batched path did batch.

The quantized model is made here with stemqa.quant (`--quant-method`, default int8-weight, no calibration)
into benchmarks/out/serve/quant-<method>, or taken from `--quant-model`. Without `--index`, a small index
(`--index-paragraphs` OpenStax physics paragraphs of the packaged sample) is built into benchmarks/out/serve.
Unless `--no-write`, the run replaces its own section of benchmarks/BENCHMARKS.md (table and sentences computed from the run's rows).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# before anything imports ray: while cluster/local.sh runs, its token-auth client settings go into the env,
# and a ray imported before them disagrees with the private instance started below (InvalidAuthToken)
import stemqa.ray_utils  # noqa: E402

stemqa.ray_utils.load_cluster_env()  # before ray is imported
OUT = ROOT / "benchmarks" / "out" / "serve"
SECTION = "## Serve: batching, RAG, quantized model"
COLUMNS = ("One scorer replica (1 CPU, 1 torch thread) per row; q/batch call = questions per @serve.batch call, "
           "q/forward = per scoring forward pass; CPU ms/req = CPU seconds of the scorer replica (and of all Serve "
           "processes: proxy, ingress, retriever, scorer) over the measured phase, per request (psutil); load avg = "
           "1-min load average before/after the row. Generation (second table, RAG-off rows): --gen-requests greedy "
           "/v1/completions (prompt: \"Explain step by step: <question>\" in the model's chat template) of up to "
           "--gen-tokens tokens, "
           "min(--concurrency, --batch-size) in flight; requests/generate call from the scorer's counters.")
GOAL = 3.0  # batched over one-at-a-time throughput, issue 7

ROLES = {"Scorer": "scorer", "Retriever": "retriever", "Ingress": "ingress", "ProxyActor": "proxy"}


def questions(n: int) -> list[dict]:
    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_sources
    from stemqa.data.paths import SAMPLE_DATA

    # short grade-8 science questions (AI2, 46-171 prompt tokens): the shape of what students ask
    records, _ = load_sources([McqSource(path="mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl",
                                         format="arc_jsonl", subject="science")], SAMPLE_DATA)
    return [{"question": q.question, "choices": q.choices, "subject": q.subject} for q in (records * n)[:n]]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# --- the model and index under test ---------------------------------------------------------------------
def quantized_model(method: str, model: str) -> str:
    """A quantized copy of `model` made with stemqa.quant (reused when already there)."""
    from stemqa.config.schema import McqSource, QuantConfig
    from stemqa.data.mcq import load_sources
    from stemqa.data.paths import SAMPLE_DATA
    from stemqa.quant import quantize

    out = OUT / f"quant-{method}"
    if (out / "stemqa_quant.json").exists():
        return str(out)
    calib, _ = load_sources([McqSource(path="mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl",
                                       format="arc_jsonl", subject="science")], SAMPLE_DATA)
    t0 = time.time()
    result = quantize(QuantConfig(method=method, calibration_samples=16), model, calib, out)
    print(f"quantized {model} with {method} into {out} in {time.time() - t0:.0f} s: {result['size_mb']} MB")
    return str(out)


def small_index(paragraphs: int) -> str:
    from stemqa.config import load_config
    from stemqa.data.paths import SAMPLE_DATA
    from stemqa.rag import build_index

    cfg = load_config("demo")
    cfg.rag.corpus = [cfg.rag.corpus[0].model_copy(update={"limit": paragraphs})]
    return str(build_index(cfg.rag, SAMPLE_DATA, OUT / f"index-{paragraphs}"))


# --- measuring ----------------------------------------------------------------------------------------------
def serve_processes() -> dict[int, str]:
    """pid -> role of the Serve processes of this driver's private Ray instance (its descendants)."""
    import psutil

    roles = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for key, role in ROLES.items():
            if f"ray::{key}" in cmd or f"ray::ServeReplica:stemqa:{key}" in cmd:
                roles[proc.pid] = role
    return roles


def cpu_seconds(pids: dict[int, str]) -> dict[str, float]:
    import psutil

    out = {role: 0.0 for role in set(ROLES.values())}
    for pid, role in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] += t.user + t.system
        except psutil.Error:
            pass
    out["client"] = time.process_time()
    return out


def deployment_stats(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(name, app_name="stemqa").stats.remote().result(timeout_s=60)


async def load(url: str, bodies: list[dict], concurrency: int, path: str = "/v1/mcqa") -> dict:
    """Closed loop: `concurrency` clients each send the next body when the last is answered. Counts the
    completion tokens of OpenAI-style answers (their `usage`) too."""
    latencies, errors, tokens = [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client):
        nonlocal errors, tokens
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(f"{url}{path}", json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += r.status_code != 200
            if r.status_code == 200:
                tokens += (r.json().get("usage") or {}).get("completion_tokens") or 0

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"requests": len(bodies), "errors": errors, "wall_s": round(wall, 1),
            "req_per_s": round(len(bodies) / wall, 3), "p50_ms": round(statistics.median(latencies)),
            "p99_ms": round(percentile(latencies, 0.99)), "tokens": tokens, "tok_per_s": round(tokens / wall, 1)}


def generation(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Concurrent greedy /v1/completions (closed loop, `load`): generated tokens per wall second and per
    scorer CPU second, p50/p99 latency, and how many requests shared each generate call."""
    pids = serve_processes()
    before, stats0 = cpu_seconds(pids), deployment_stats("Scorer")
    bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0} for p in prompts]
    res = asyncio.run(load(url, bodies, concurrency, "/v1/completions"))
    cpu = cpu_seconds(pids)["scorer"] - before["scorer"]
    stats1 = deployment_stats("Scorer")
    calls = stats1["generate_calls"] - stats0["generate_calls"]
    return {"gen_requests": len(bodies), "gen_errors": res["errors"], "gen_tokens": res["tokens"],
            "gen_tok_per_s": res["tok_per_s"],
            "gen_tok_per_cpu_s": round(res["tokens"] / cpu, 1) if cpu > 0 else None,
            "gen_p50_ms": res["p50_ms"], "gen_p99_ms": res["p99_ms"],
            "gen_per_call": round((stats1["gen_items"] - stats0["gen_items"]) / calls, 1) if calls else None,
            "gen_batch_sizes": {k: v - stats0["gen_batch_sizes"].get(k, 0) for k, v in stats1["gen_batch_sizes"].items()
                                if v - stats0["gen_batch_sizes"].get(k, 0)}}


def run_row(label: str, model: str, index: str | None, rag: bool, batch: int, args, bodies) -> dict:
    from stemqa.stages.serve import deploy
    from stemqa.config import load_config

    wait = [f"serve.batch_wait_timeout_s={args.batch_wait_s}"] if args.batch_wait_s is not None else []
    cfg = load_config("demo", wait + [f"serve.port={args.port}", f"serve.max_batch_size={batch}",
                               "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                               "serve.cpus_per_replica=1", "serve.retriever_cpus=0.5", "serve.ingress_cpus=0.1",
                               f"serve.max_ongoing_requests={max(64, args.concurrency)}"])
    os.environ.pop(cfg.serve.api_key_env, None)
    t0 = time.time()
    url = deploy(cfg, model, index if rag else None)
    deploy_s = time.time() - t0
    sent = [dict(b, use_rag=rag) for b in bodies]
    # warm-up, not measured: first-call costs (tokenizer caches, allocator, thread pools)
    asyncio.run(load(url, sent[:4], 4))
    pids = serve_processes()
    stats0 = deployment_stats("Scorer")
    cpu0, load0 = cpu_seconds(pids), os.getloadavg()[0]
    res = asyncio.run(load(url, sent, args.concurrency))
    cpu1, load1 = cpu_seconds(pids), os.getloadavg()[0]
    stats1 = deployment_stats("Scorer")
    cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
    calls = stats1["batches"] - stats0["batches"]
    passes = stats1["forward_passes"] - stats0["forward_passes"]
    items = stats1["items"] - stats0["items"]
    row = {"model": label, "rag": rag, "max_batch_size": batch, "deploy_s": round(deploy_s, 1), **res,
           "q_per_batch": round(items / calls, 1) if calls else None,
           "q_per_forward": round(items / passes, 1) if passes else None,
           "scorer_threads": stats1["torch_threads"], "cpu_s": cpu,
           "scorer_cpu_ms_per_req": round(1000 * cpu["scorer"] / res["requests"]),
           "serve_cpu_ms_per_req": round(1000 * sum(v for k, v in cpu.items() if k != "client") / res["requests"]),
           "load_avg": [round(load0, 1), round(load1, 1)]}
    if not rag and not args.no_generation:
        # a student's question in the model's chat format, as a program sends it to /v1/completions: the instruct
        # model answers at length (after a bare `Answer:` it mostly stops at once)
        from stemqa.models import load_tokenizer

        tok = load_tokenizer(model)
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Explain step by step: {b['question']}"}],
                                           tokenize=False, add_generation_prompt=True)
                   for b in bodies][:args.gen_requests]
        row.update(generation(url, prompts, min(args.concurrency, args.batch_size), args.gen_tokens))
    return row


# --- report -----------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| model | RAG | max batch | q/batch call | q/forward | req/s | p50 ms | p99 ms | scorer CPU ms/req "
             "| Serve CPU ms/req | errors | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'on' if r['rag'] else 'off'} | {r['max_batch_size']} | {r['q_per_batch']} "
                     f"| {r['q_per_forward']} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} "
                     f"| {r['scorer_cpu_ms_per_req']} | {r['serve_cpu_ms_per_req']} | {r['errors']} "
                     f"| {r['load_avg'][0]}/{r['load_avg'][1]} |")
    gen = [r for r in rows if "gen_tok_per_s" in r]
    if gen:
        lines += ["", "| model | max batch | requests/generate call | gen tok/s | tok/CPU s | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['max_batch_size']} | {r['gen_per_call']} | {r['gen_tok_per_s']} "
                  f"| {r['gen_tok_per_cpu_s']} | {r['gen_p50_ms']} | {r['gen_p99_ms']} | {r['gen_errors']} |" for r in gen]
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    out = []
    for label in dict.fromkeys(r["model"] for r in rows):
        for rag in (False, True):
            on = [r for r in rows if r["model"] == label and r["rag"] == rag and r["max_batch_size"] > 1]
            off = [r for r in rows if r["model"] == label and r["rag"] == rag and r["max_batch_size"] == 1]
            if on and off:
                on, off = on[0], off[0]
                out.append(f"{label}, RAG {'on' if rag else 'off'}: batching gives "
                           f"{on['req_per_s'] / off['req_per_s']:.2f}x req/s (wall), "
                           f"{off['scorer_cpu_ms_per_req'] / on['scorer_cpu_ms_per_req']:.2f}x fewer scorer CPU "
                           f"seconds per request, p99 {on['p99_ms']} vs {off['p99_ms']} ms")
                if "gen_tok_per_s" in on and "gen_tok_per_s" in off:
                    out.append(f"{label}, /v1/completions generation: batching gives "
                               f"{on['gen_tok_per_s'] / off['gen_tok_per_s']:.2f}x tokens/s (wall), "
                               f"{on['gen_tok_per_cpu_s'] / off['gen_tok_per_cpu_s']:.2f}x tokens per scorer CPU "
                               f"second, p99 {on['gen_p99_ms']} vs {off['gen_p99_ms']} ms")
    return out


def goal_lines(rows: list[dict]) -> list[str]:
    """Whether this run's batching reached GOAL x, per model and endpoint (computed; no fixed text)."""
    out = []
    for label in dict.fromkeys(r["model"] for r in rows):
        on = [r for r in rows if r["model"] == label and not r["rag"] and r["max_batch_size"] > 1]
        off = [r for r in rows if r["model"] == label and not r["rag"] and r["max_batch_size"] == 1]
        if not (on and off):
            continue
        on, off = on[0], off[0]
        pairs = [("/v1/mcqa", on["req_per_s"] / off["req_per_s"])]
        if "gen_tok_per_s" in on and "gen_tok_per_s" in off:
            pairs.append(("/v1/completions", on["gen_tok_per_s"] / off["gen_tok_per_s"]))
        for endpoint, x in pairs:
            out.append(f"{label}, {endpoint}: {x:.2f}x with batching (RAG off), "
                       + (f"the {GOAL:.0f}x goal is met" if x >= GOAL else f"{GOAL / x:.2f}x short of the {GOAL:.0f}x goal")
                       + f"; load average {on['load_avg'][0]}-{off['load_avg'][1]} over these rows")
    return out


def write_section(body: str) -> None:
    from mdsection import replace_section

    replace_section(SECTION, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant-model", default=None, help="quantized model directory (e.g. <run>/quant/model)")
    p.add_argument("--quant-method", default="int8-weight", choices=["int8-weight", "gptq"],
                   help="stemqa.quant method that makes the quantized model when --quant-model is not given")
    p.add_argument("--index", default=None, help="RAG index directory (default: a small one built here)")
    p.add_argument("--index-paragraphs", type=int, default=300)
    p.add_argument("--no-rag", action="store_true", help="skip the RAG-on rows")
    p.add_argument("--rag-for", default="full,quant", help="models that get RAG-on rows: full, quant or both")
    p.add_argument("--rag-requests", type=int, default=None, help="requests of a RAG-on row (default: --requests; "
                   "RAG prompts are ~5x longer)")
    p.add_argument("--rows", default="full,quant", help="which models: full, quant or both")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=32, help="in-flight requests (>= 2x batch size fills batches)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-generation", action="store_true", help="skip the generation rows")
    p.add_argument("--gen-requests", type=int, default=32, help="greedy /v1/completions per generation row, sent "
                   "min(--concurrency, --batch-size) at a time")
    p.add_argument("--gen-tokens", type=int, default=32, help="max_tokens of each generation request")
    p.add_argument("--batch-wait-s", type=float, default=None, help="serve.batch_wait_timeout_s (MCQA; default: "
                   "the config's)")
    p.add_argument("--port", type=int, default=8127)
    p.add_argument("--no-write", action="store_true", help="leave benchmarks/BENCHMARKS.md as it is")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ray import serve

    from stemqa.models import resolve_model
    import ray

    from stemqa.ray_utils import WORKER_ENV

    OUT.mkdir(parents=True, exist_ok=True)
    # a private instance without the dashboard: Serve's Python API does not need it, and at a load average of
    # 40+ (other jobs on this shared machine) the dashboard missed Ray's start-up deadline and ray.init failed
    # (and Ray waits only 30 s for its raylet to register, so an overloaded machine gets three tries)
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, runtime_env={"env_vars": dict(WORKER_ENV)})
            break
        except Exception as e:  # noqa: BLE001 - "The current node timed out during startup"
            print(f"ray.init failed ({e}); load average {os.getloadavg()[0]:.0f}", flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    models = []
    if "full" in args.rows:
        models.append(("full", "full", str(resolve_model(args.model))))
    if "quant" in args.rows:
        quant = args.quant_model or quantized_model(args.quant_method, args.model)
        models.append(("quant", f"quant ({json.loads((Path(quant) / 'stemqa_quant.json').read_text())['method']})"
                       if (Path(quant) / "stemqa_quant.json").exists() else "quant", quant))
    index = None if args.no_rag else (args.index or small_index(args.index_paragraphs))
    bodies = questions(args.requests)
    rows = []
    for kind, label, model in models:
        for rag in ([False] if index is None or kind not in args.rag_for else [False, True]):
            for batch in (args.batch_size, 1):
                row = run_row(label, model, index, rag, batch, args,
                              bodies[:args.rag_requests] if rag and args.rag_requests else bodies)
                print(json.dumps(row), flush=True)
                rows.append(row)
    serve.shutdown()

    (OUT / "serve.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    cmd = "python benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, shared"
    report = "\n".join([table(rows), "", *[f"- {line}" for line in ratios(rows) + goal_lines(rows)]])
    print("\n" + report)
    if not args.no_write:
        write_section(f"{SECTION}\n\nCommand: `{cmd.strip()}` ({date.today()}, {machine}).\n\n{COLUMNS}\n\n"
                      f"{report}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
