"""The Serve app on the real local two-node cluster (cluster/local.sh), deployed with `ray job submit` as an
operator would, under load and under faults, over real HTTP.

- 200 concurrent mixed requests (/v1/mcqa with and without RAG, completions, echo scoring, chat, and bad ones
  of ten kinds): no 5xx, every good one answered, every bad one a 4xx whose body names the error and field.
- Faults under load: a scorer replica killed (SIGKILL), then the worker node stopped (cluster/local.sh
  stop-worker), while four clients keep asking: no request fails (the ingress retries calls whose replica
  died; the ingress sits on the head node, with the only HTTP proxy), and Serve is back to two scorer
  replicas. The worker node is started again afterwards for the tests that follow.

Figures (latencies, failures, recovery times) go to tests/artifacts/serve_cluster.json for
benchmarks/bench_reliability.py.
"""
import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serve.drill import Sustained, mixed_requests, send_all, summarize

ROOT = Path(__file__).resolve().parents[1]
PORT = int(os.environ.get("STEMQA_TEST_SERVE_PORT", "8123"))
KEY = "cluster-key-456"
RESULTS: dict = {}

pytestmark = pytest.mark.cluster


class ClusterOps:
    """The cluster as its operator sees it: the dashboard's REST API (Serve status, nodes), the `serve` CLI and
    cluster/local.sh."""

    def __init__(self, cluster: dict):
        self.env, self.dashboard = cluster["env"], cluster["dashboard"]
        token_path = self.env.get("RAY_AUTH_TOKEN_PATH")
        self.headers = {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"} if token_path else {}

    def get(self, path: str) -> dict:
        r = httpx.get(self.dashboard + path, headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def replicas(self, deployment: str) -> list[dict]:
        apps = self.get("/api/serve/applications/")["applications"]
        if "stemqa" not in apps:
            return []
        return apps["stemqa"]["deployments"].get(deployment, {}).get("replicas", [])

    def running(self, deployment: str) -> list[dict]:
        return [r for r in self.replicas(deployment) if r["state"] == "RUNNING"]

    def nodes(self) -> list[dict]:
        return self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]

    def head_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n["is_head_node"])

    def alive_nodes(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self.nodes())

    def serve_shutdown(self) -> None:
        subprocess.run([str(Path(self.env["RAY"]).parent / "serve"), "shutdown", "-y", "-a", self.dashboard],
                       env=self.env, capture_output=True, timeout=120)
        self.wait(lambda: not self.get("/api/serve/applications/")["applications"], 60, "Serve to shut down")

    def local_sh(self, action: str) -> str:
        out = subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), action], env=self.env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def submit(self, *args: str, env_vars: dict = None, timeout: int = 600) -> str:
        cmd = [self.env["RAY"], "job", "submit", "--working-dir", str(ROOT)]
        if env_vars:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        out = subprocess.run(cmd + ["--", "python", "-m", *args], capture_output=True, text=True, cwd=ROOT,
                             env=dict(self.env, RAY_ADDRESS=self.dashboard), timeout=timeout)
        assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
        return out.stdout

    @staticmethod
    def wait(cond, timeout: float, what: str) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if cond():
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"waited {timeout:.0f} s for {what}")


@pytest.fixture(scope="module")
def cluster_app(local_cluster, tmp_path_factory):
    ops = ClusterOps(local_cluster)
    ops.serve_shutdown()  # an app an earlier test left (the pipeline's) would hold Serve's port and CPUs
    index = tmp_path_factory.mktemp("cluster_index") / "index"
    corpus = "[{kind: openstax, path: corpus/openstax_university_physics.jsonl, limit: 30}]"
    ops.submit("jobs.rag", "build", "--out", str(index), "--set", f"rag.corpus={corpus}")
    # two scorer replicas of 0.3 CPU: with the retriever (0.25) and the ingress (0.1) they fit on the head
    # node alone (1 CPU) once the worker node is gone
    sets = [f"serve.port={PORT}", "serve.ingress_resource=head", "serve.autoscaling.min_replicas=2",
            "serve.autoscaling.max_replicas=2", "serve.cpus_per_replica=0.3", "serve.health_check_period_s=1",
            "serve.health_check_timeout_s=5", "rag.top_k=2"]
    ops.submit("jobs.serve", "--model", "tiny-qwen3", "--index", str(index),
               *[a for s in sets for a in ("--set", s)], env_vars={"STEMQA_API_KEY": KEY})
    yield {"url": f"http://127.0.0.1:{PORT}", "ops": ops}
    try:
        if ops.alive_nodes() < 2:
            ops.local_sh("start-worker")
    finally:
        ops.serve_shutdown()
        from conftest import ARTIFACTS

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "serve_cluster.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def test_200_concurrent_mixed_requests_on_the_two_node_cluster(cluster_app):
    ops = cluster_app["ops"]
    nodes = {r["node_id"] for r in ops.running("Scorer")}
    t0 = time.perf_counter()
    outcomes = asyncio.run(send_all(cluster_app["url"], mixed_requests(200), KEY))
    summary = summarize(outcomes, time.perf_counter() - t0)
    RESULTS["load"] = {**summary.__dict__, "scorer_nodes": len(nodes)}
    print(f"\n200 mixed requests in {summary.wall_s:.1f} s: {summary.statuses}; good p50 {summary.p50_s:.2f} s, "
          f"p99 {summary.p99_s:.2f} s; bad ones: {summary.bad_kinds}")
    assert summary.server_errors == 0 and summary.transport_errors == 0, summary.statuses
    assert not summary.wrong, summary.wrong[:5]
    assert summary.good == 140 and summary.bad == 60
    assert len(summary.bad_kinds) == 10 and all(s[0].startswith("4") for s in summary.bad_kinds.values())


def test_a_killed_replica_and_a_stopped_worker_node_lose_no_request(cluster_app):
    ops = cluster_app["ops"]
    head = ops.head_id()
    scorers = ops.running("Scorer")
    assert len(scorers) == 2, scorers
    facts: dict = {"scorer_nodes_before": sorted("head" if r["node_id"] == head else "worker" for r in scorers)}
    with Sustained(cluster_app["url"], KEY, clients=4) as load:
        assert load.wait_answers_since(time.time(), 4, timeout=60) is not None
        # 1. a scorer replica dies (SIGKILL: no goodbye); the one on the head node, so the worker keeps one
        victim = next((r for r in scorers if r["node_id"] == head), scorers[0])
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.time()
        facts["replica_answering_again_s"] = load.wait_answers_since(killed, 4, timeout=120)
        ops.wait(lambda: len([r for r in ops.running("Scorer") if r["pid"] != victim["pid"]]) == 2, 120,
                 "a replacement scorer replica")
        facts["replica_replaced_s"] = time.time() - killed  # Serve shows two running replicas again
        # 2. the worker node stops, with what runs on it
        on_worker = {d: sum(r["node_id"] != head for r in ops.running(d)) for d in ("Scorer", "Retriever", "Ingress")}
        facts["on_worker_when_stopped"] = on_worker
        ops.local_sh("stop-worker")
        stopped = time.time()
        facts["node_answering_again_s"] = load.wait_answers_since(stopped, 4, timeout=180)
        ops.wait(lambda: len(ops.running("Scorer")) == 2 and len(ops.running("Retriever")) == 1
                 and all(r["node_id"] == head for r in ops.running("Scorer")), 180, "both scorer replicas on the head")
        facts["node_replicas_back_s"] = time.time() - stopped
        time.sleep(2)  # a little load on the recovered app
    ops.local_sh("start-worker")
    ops.wait(lambda: ops.alive_nodes() == 2, 120, "the worker node to come back")
    outcomes = load.outcomes
    failed = [(o.kind, o.status, o.detail) for o in outcomes if not o.ok]
    health = httpx.get(cluster_app["url"] + "/healthz", timeout=30).json()
    facts.update(requests=len(outcomes), failed=len(failed), failures=failed[:10],
                 ingress_retries=health.get("retries"),
                 statuses={str(s): sum(o.status == s for o in outcomes) for s in {o.status for o in outcomes}})
    RESULTS["faults"] = facts
    print(f"\nfaults under load: {facts}")
    assert on_worker["Ingress"] == 0  # serve.ingress_resource=head kept it on the head node
    assert not failed, failed[:10]
    assert facts["replica_answering_again_s"] is not None and facts["node_answering_again_s"] is not None
