"""Reliability: load held, faults survived, bad inputs tried, what was lost (issue 21).

    python benchmarks/bench_reliability.py            # runs the tests below, then writes the section
    python benchmarks/bench_reliability.py --no-write # print only

Runs, each in its own pytest process, the tests that prove it (each asserts what it reports):
- tests/test_hostile_input.py: hypothesis throws random bytes, wrong types and huge values at every bad-input
  path (request bodies, token ids, messages, body sizes, the MCQ/preference/QA loaders, config loading);
- tests/test_serve.py (hostile request, token budget, long echo, API key, seeded sampling, random bodies over
  HTTP, replica kill):
  the app on a private Ray instance with the tiny Qwen3;
- tests/test_serve_cluster.py: the app on the real two-node cluster (cluster/local.sh), 200 concurrent mixed
  requests, then a scorer replica killed and the worker node stopped under load.
The tests leave their figures in tests/artifacts/*.json; this script reads them, with the tests' pass/fail
and durations from junit XML, and replaces the "## Reliability" section of BENCHMARKS.md with sentences
computed from this run's numbers alone. The machine load (1-minute load average before and after) is
recorded beside them: colleagues share the 2 cores, so latencies are not speed benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
OUT = ROOT / "benchmarks" / "out" / "reliability"
SECTION = "## Reliability: load, faults, hostile input"
SERVE_TESTS = ("hostile_echo or token_budget or long_echo or api_key_is_checked or seeded_request "
               "or random_bodies or killed_replica")
RUNS = [
    ("hostile input", ["tests/test_hostile_input.py"], "hostile_input_counts.json"),
    ("single app", ["tests/test_serve.py", "-k", SERVE_TESTS], "serve_app.json"),
    ("cluster", ["tests/test_serve_cluster.py"], "serve_cluster.json"),
]


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_pytest(name: str, args: list[str], artifact: str) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    junit = OUT / f"{name.replace(' ', '_')}.xml"
    (ARTIFACTS / artifact).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"--junitxml={junit}", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        tests.append({"name": case.get("name"), "time_s": float(case.get("time", 0)),
                      "result": "failed" if failed else "skipped" if skipped else "passed"})
    figures = json.loads((ARTIFACTS / artifact).read_text()) if (ARTIFACTS / artifact).exists() else {}
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-2000:], sep="\n")
    return {"command": "python -m pytest " + shlex.join(args), "rc": out.returncode, "wall_s": wall, "tests": tests,
            "figures": figures}


def _t(run: dict, fragment: str) -> str:
    times = [t["time_s"] for t in run["tests"] if fragment in t["name"]]
    return f"{sum(times):.0f} s" if times else "n/a"


def section(runs: dict, load_before: float, load_after: float, started: str) -> str:
    hyp, app, cl = runs["hostile input"], runs["single app"], runs["cluster"]
    counts = hyp["figures"]
    lines = [
        f"`python benchmarks/bench_reliability.py`, {started}, {platform.node() or 'this machine'}: 2 CPUs, "
        f"no GPU, shared with colleagues' jobs (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after the run), so latencies here are not speed figures. Every figure comes from a "
        "test that asserts it; the tests are in the default suite (CI).",
        "",
        "| test run | command | tests passed | wall |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        passed = sum(t["result"] == "passed" for t in run["tests"])
        lines.append(f"| {name} | `{run['command']}` | {passed} of {len(run['tests'])} | {run['wall_s']:.0f} s |")
    lines.append("")

    load = cl["figures"].get("load")
    if load:
        lines.append(
            f"**Load held.** 200 concurrent mixed requests against the app on the two-node cluster "
            f"({load['good']} good: /v1/mcqa with and without RAG, completions, echo scoring, chat; {load['bad']} "
            f"bad of {len(load['bad_kinds'])} kinds) finished in {load['wall_s']:.1f} s: statuses "
            f"{', '.join(f'{k}: {v}' for k, v in load['statuses'].items())}; {load['server_errors']} 5xx, "
            f"{load['transport_errors']} without an HTTP answer, {len(load['wrong'])} answered wrongly (a good "
            f"request without an answer, a bad one without a 4xx naming its field). Good requests, all sent at "
            f"once: p50 {load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s. Each bad kind's status: "
            + "; ".join(f"{k} {'/'.join(v)}" for k, v in load["bad_kinds"].items()) + ".")
        lines.append("")
    faults = cl["figures"].get("faults")
    kill = app["figures"].get("replica_kill")
    if faults or kill:
        text = "**Faults survived.** "
        if kill:
            text += (f"With one scorer replica (private Ray instance), that replica killed under 4 clients' load: "
                     f"{kill['requests']} requests, {kill['failed']} failed; answering again "
                     f"{kill['answering_again_s']:.1f} s after the kill"
                     + (" (requests waited for the replacement instead of failing). " if not kill["failed"] else ". "))
        if faults:
            text += (f"On the two-node cluster, under 4 clients' load ({faults['requests']} requests in all): a "
                     f"scorer replica SIGKILLed: answering again {faults['replica_answering_again_s']:.1f} s after, "
                     f"two replicas running again after {faults['replica_replaced_s']:.0f} s; then the worker node "
                     f"stopped while it held {faults['on_worker_when_stopped']['Scorer']} scorer and "
                     f"{faults['on_worker_when_stopped']['Retriever']} retriever replica(s): answering again "
                     f"{faults['node_answering_again_s']:.1f} s after, both scorer replicas running on the head "
                     f"{faults['node_replicas_back_s']:.0f} s after. {faults['failed']} requests failed; the "
                     f"ingress sent {faults['ingress_retries']} call(s) again after their replica died.")
        lines += [text, ""]
    hostile, budget, echo = (app["figures"].get(k) for k in ("hostile_request", "over_budget", "long_echo"))
    if hostile:
        text = (f"**Hostile requests.** The request that took the demo's replica down (64 prompts of 4,000 token "
                f"ids, echo + logprobs, {hostile['bytes'] / 1e6:.2f} MB) got {hostile['status']} "
                f"(\"{hostile['error']}\") and the same replica process answered the next request. ")
        if budget:
            text += f"Under the body limit but over the token budget: {budget['status']} (\"{budget['error']}\"). "
        if echo:
            text += (f"A {echo['prompts']} x {echo['tokens_each']:,}-token echo + logprobs request within budget "
                     f"(full-vocabulary log-probs would be {echo['prompts'] * echo['tokens_each'] * echo['vocab'] * 4 / 1e9:.1f} GB "
                     f"of float32) moved the replica's peak RSS from {echo['peak_rss_before_mb']:.0f} to "
                     f"{echo['peak_rss_after_mb']:.0f} MB.")
        lines += [text, ""]
    if counts:
        lines.append(f"**Bad inputs tried.** {sum(counts.values()):,} generated inputs (hypothesis, derandomized): "
                     + ", ".join(f"{k} {v}" for k, v in counts.items())
                     + ". Each got a clear error naming the field or the file and row, or was valid; none crashed "
                     "or hung.")
        http = app["figures"].get("random_http_bodies")
        if http:
            lines[-1] += (f" Over HTTP to the live app, {http['sent']} generated bodies got "
                          + ", ".join(f"{k}: {v}" for k, v in http["statuses"].items())
                          + " (no 5xx), and the same replica process answered afterwards.")
        lines.append("")
    failed = [f"{n}: {t['name']}" for n, r in runs.items() for t in r["tests"] if t["result"] != "passed"]
    lost = (faults or {}).get("failed", 0) + (kill or {}).get("failed", 0)
    lines.append(f"**What was lost.** {lost} requests under faults; "
                 + (f"tests not passing: {', '.join(failed)}." if failed else "every test above passed."))
    lines.append("")
    lines.append("Test durations (this run; junit times, so a module's first test carries its fixture: the "
                 "deployment, and on the cluster the cluster's start, the index and deploy jobs): " + "; ".join(
        f"{t['name']} {t['time_s']:.0f} s" for r in runs.values() for t in r["tests"] if t["time_s"] >= 1) + ".")
    return "\n".join(lines)


def write_section(body: str) -> None:
    from mdsection import replace_section

    replace_section(SECTION, f"{SECTION}\n\n{body.strip()}\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    before = load1()
    runs = {name: run_pytest(name, a, artifact) for name, a, artifact in RUNS}
    body = section(runs, before, load1(), started)
    (OUT / "summary.json").write_text(json.dumps(runs, indent=2, default=str))
    print(body)
    if not args.no_write:
        write_section(body)
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
