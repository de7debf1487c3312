"""Cluster check: one Ray task on every alive node; records which node ran what, in the run's manifest.

    stemqa submit nodes --config demo [--hold 30] [--timeout 120]      (or: python cluster/nodes.py ...)

Each task is pinned to its node (NodeAffinitySchedulingStrategy, not soft), writes a small file into the
storage path from that node (so shared storage is checked from every node, not only the driver's) and
reports its node id, address, custom resources and pid. Tasks are not retried and the wait is bounded: a
node that dies mid-run (`cluster/local.sh stop-worker`) makes the job fail with a message naming that node
instead of hanging on a task that can never be placed again.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo importable

from stemqa.cli.common import config_from, connect, open_run, parser  # noqa: E402


def _on_node(out_dir: str, hold_s: float) -> dict:
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    start = time.time()
    time.sleep(hold_s)  # lets a test stop a node while the task runs
    info = {"node_id": node_id, "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
            "pid": os.getpid(), "worker_id": ctx.get_worker_id(), "started": start, "ended": time.time()}
    path = Path(out_dir) / f"{node_id}.json"  # written from this node: the storage path must be shared by all
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    info["file"] = str(path)
    return info


def main(argv=None) -> int:
    p = parser("stemqa submit nodes", __doc__)
    p.add_argument("--hold", type=float, default=0.0, help="seconds each task sleeps before it reports")
    p.add_argument("--timeout", type=float, default=120.0, help="longest wait for all tasks (seconds)")
    args = p.parse_args(argv)
    cfg = config_from(args)

    import ray

    address = connect(cfg)
    run = open_run(args, cfg)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(f"run {run.id} at {run.path}; ray {address}; {len(nodes)} alive nodes", flush=True)
    try:
        return _check(run, nodes, args)
    except NodeFailure as e:  # recorded as failed in the manifest; one clear line here, exit status 1
        print(f"error: {e}", file=sys.stderr)
        return 1


def _node_is_dead(node_id: str, wait_s: float = 15.0) -> bool:
    import ray

    deadline = time.time() + wait_s
    while True:  # the GCS marks a node dead a few seconds after its worker processes are gone
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if node_id not in alive or time.time() > deadline:
            return node_id not in alive
        time.sleep(0.5)


def _describe_failure(error, node_id: str) -> str:
    """One line for a failed task. When a node is stopped, Ray reports either NodeDiedError or, if the task's
    worker process is killed first, WorkerCrashedError; asking the GCS whether the node is gone names the cause
    the same way in both cases."""
    import ray

    first = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    if isinstance(error, ray.exceptions.NodeDiedError) or not _node_is_dead(node_id):
        return first
    return f"NodeDiedError: node {node_id[:12]} left the cluster while its task ran ({first})"


class NodeFailure(RuntimeError):
    """Work pinned to a node did not finish (the node died, or the bounded wait ran out)."""


def _check(run, nodes: list, args) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with run.stage("nodes", inputs={"nodes": [n["NodeID"] for n in nodes]}, config={"hold_s": args.hold}) as rec:
        out_dir = str(rec.dir / "per_node")
        # max_retries=0: a task whose node died would otherwise wait forever for a node that is gone
        task = ray.remote(num_cpus=0.01, max_retries=0)(_on_node)
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(out_dir, args.hold): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=args.timeout)
        placement, errors = [], []
        for ref, node in refs.items():
            custom = sorted(k for k in node["Resources"] if k not in ("CPU", "GPU", "memory", "object_store_memory")
                            and not k.startswith("node:"))
            row = {"expected_node": node["NodeID"], "head": "node:__internal_head__" in node["Resources"],
                   "resources": custom}
            if ref in pending:
                ray.cancel(ref, force=True)
                row["error"] = f"no result within {args.timeout:.0f} s"
            else:
                try:
                    row.update(ray.get(ref))
                except ray.exceptions.RayError as e:
                    row["error"] = _describe_failure(e, node["NodeID"])
            if "error" in row:
                errors.append(f"node {node['NodeID'][:12]} ({', '.join(custom) or 'no custom resources'}): {row['error']}")
            placement.append(row)
        (rec.dir / "placement.json").write_text(json.dumps(placement, indent=2))
        rec.add_artifact("placement", rec.dir / "placement.json")
        rec.add_metrics(nodes=len(nodes), ok=len(placement) - len(errors))
        print(f"{'node':<14} {'head':<5} {'resources':<20} {'task pid':>8}  result")
        for row in placement:
            result = row.get("error") or f"ran on {row['node_id'][:12]}, wrote {row['file']}"
            print(f"{row['expected_node'][:12]:<14} {str(row['head']):<5} {','.join(row['resources']):<20} "
                  f"{row.get('pid', '-'):>8}  {result}", flush=True)
        if errors:
            raise NodeFailure("work failed on " + "; ".join(errors))
    print(f"placement: {rec.dir / 'placement.json'}")
    return 0


if __name__ == "__main__":
    from stemqa.cli.common import run_main
    from stemqa.ray_utils import load_cluster_env

    load_cluster_env()
    run_main(main)
