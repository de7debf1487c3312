"""`stemqa submit | jobs | stop`: run stages on a Ray cluster as Ray jobs (Ray's JobSubmissionClient).

    stemqa submit eval --config tests/configs/tiny.yaml --set model.name=tiny-qwen3 [--address URL] [--no-wait]
    stemqa submit pipeline --config qwen3-0.6b --address http://127.0.0.1:8265
    stemqa jobs [--address URL]          # id, status, start time, entrypoint
    stemqa stop <job id> [--address URL]

The job runs `python -m stemqa.cli <stage> ...` on the cluster with this repository as its working dir (data,
runs, venvs, caches and test outputs left out). The config is validated here first, so a bad field fails
before anything is uploaded. Relative storage/data/run paths are made absolute here, so artifacts land where
the submitter expects (on a multi-machine cluster, cluster.storage_path must be a mount every node shares).
While the job runs its progress lines (stemqa.progress) come with its logs.
Address default: $RAY_ADDRESS when it is a dashboard URL, else the local cluster's dashboard
($STEMQA_CLUSTER_DIR/dashboard, written by cluster/local.sh).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Optional

from stemqa.config import load_config
from stemqa.ray_utils import local_cluster_dir, read_env_file

ROOT = Path(__file__).resolve().parents[2]  # the repository: the job's working dir
NOT_STAGES = ("submit", "jobs", "stop", "config", "runs", "report", "quant")
# Besides the stages: a cluster check that runs one task on each node and records where each ran.
EXTRA_ENTRYPOINTS = {"nodes": "python cluster/nodes.py"}
# Left out of the uploaded working dir (gitignore syntax, relative to the repo; a leading / anchors at the root,
# so /data does not drop stemqa/data).
WORKING_DIR_EXCLUDES = ["/data", "/runs", "/.venv", "/venv", "/.git", "/tests/artifacts", "/benchmarks/out",
                        "/build", "/.cache", "/.pytest_cache", "__pycache__", "*.egg-info", "*.pyc"]
# Set in every job unless the submitter's environment says otherwise (the hub is unreachable offline).
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
PASSTHROUGH_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission that cannot be made (no cluster, bad stage, config outside the repo)."""


def stages() -> list[str]:
    from stemqa.cli import COMMANDS

    return [c for c in COMMANDS if c not in NOT_STAGES] + list(EXTRA_ENTRYPOINTS)


def absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def use_local_cluster_auth(address: str) -> None:
    """Talking to the cluster of cluster/local.sh: take its auth settings (RAY_AUTH_MODE, token path) from the
    env file it writes, unless this process already has its own. Must run before Ray reads its config."""
    env_file, dash = local_cluster_dir() / "env", local_cluster_dir() / "dashboard"
    if not env_file.exists() or not dash.exists() or dash.read_text().strip() != address.rstrip("/"):
        return
    for key, value in read_env_file(env_file).items():
        os.environ.setdefault(key, value)


def default_address() -> str:
    """The dashboard URL of the cluster to talk to: $RAY_ADDRESS (http) or the local cluster's."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith("http"):
        return env
    dash = local_cluster_dir() / "dashboard"
    if dash.exists() and dash.read_text().strip():
        return dash.read_text().strip()
    raise SubmitError("no cluster address: pass --address http://<head>:8265, set RAY_ADDRESS, "
                      "or start the local cluster with `cluster/local.sh start`")


def client(address: Optional[str]):
    address = address or default_address()
    use_local_cluster_auth(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def pinned_requirements() -> list[str]:
    """The exact pins of pyproject.toml, for clusters whose image lacks stemqa's dependencies (--pip)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.startswith("torch")]  # torch comes with the image (CUDA build on GPU nodes)


def job_env() -> dict[str, str]:
    """Env vars of the job: defaults, HF settings and every STEMQA_* of the submitter (data root, API key env,
    ports) so that a job behaves as the same command run here."""
    from stemqa.ray_utils import WORKER_ENV

    env = dict(DEFAULT_ENV)
    env.update({k: v for k, v in os.environ.items() if k in PASSTHROUGH_ENV or k.startswith("STEMQA_")})
    env.pop("STEMQA_CLUSTER_DIR", None)  # the submitter's local cluster files mean nothing on the cluster
    # stemqa.ray_utils.init_ray gives its workers WORKER_ENV in the driver's own runtime_env; Ray refuses a job
    # whose env_vars repeat a key of the driver's ("Failed to merge the Job's runtime env"), so leave them out,
    # and let a stage's ray.init add fields of its own to the job's runtime_env instead of failing.
    for key in WORKER_ENV:
        env.pop(key, None)
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return env


def config_arg(config: str) -> str:
    """The --config the job gets: a preset name, or the file's path inside the uploaded repo."""
    path = Path(config)
    if not path.exists():
        return config  # a preset (load_config already checked it)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        raise SubmitError(f"--config {config}: the file is outside the repository ({ROOT}), so the job would not "
                          "see it; copy it into the repository or use a preset") from None


def entrypoint_args(args, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """Validate the config here; the job's arguments (absolute storage/data/run paths) and extra env vars."""
    from stemqa.data.paths import SAMPLE_DATA, data_root

    cfg = load_config(args.config, args.overrides)  # ConfigError names the field, before any upload
    # the absolute forms below replace what the user wrote for these two
    sets = [o for o in args.overrides if o.split("=", 1)[0].strip() not in ("cluster.storage_path", "data.root")]
    sets.append(f"cluster.storage_path={absolute(cfg.cluster.storage_path)}")
    if cfg.data.root != "auto":
        sets.append(f"data.root={absolute(cfg.data.root)}")
    env = {}
    if cfg.data.root == "auto" and not os.environ.get("STEMQA_DATA_ROOT") and data_root("auto") != SAMPLE_DATA:
        # what 'auto' means here; on a cluster without that directory the job falls back to its own 'auto'
        env["STEMQA_DATA_ROOT"] = str(data_root("auto"))
    argv = ["--config", config_arg(args.config)]
    for s in sets:
        argv += ["--set", s]
    if args.run:
        argv += ["--run", absolute(args.run)]
    return argv + extra, env


def build_submission(args, extra: list[str]) -> dict:
    """Keyword arguments for JobSubmissionClient.submit_job."""
    if args.stage not in stages():
        raise SubmitError(f"unknown stage {args.stage!r}; one of: {', '.join(stages())}")
    import shlex

    cmd = EXTRA_ENTRYPOINTS.get(args.stage) or f"python -m stemqa.cli {args.stage}"
    argv, env = entrypoint_args(args, extra)
    entrypoint = cmd + " " + shlex.join(argv)
    runtime_env = {"working_dir": str(ROOT), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": {**job_env(), **env}}
    if args.pip:
        runtime_env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    sub = {"entrypoint": entrypoint, "runtime_env": runtime_env,
           "metadata": {"stemqa_stage": args.stage, "config": str(args.config)}}
    if args.job_id:
        sub["submission_id"] = args.job_id
    if args.entrypoint_num_gpus:
        sub["entrypoint_num_gpus"] = args.entrypoint_num_gpus
    return sub


def submit_with_retry(c, sub: dict, verbose: bool = False, patience_s: float = 120.0) -> str:
    """submit_job, waiting while the head's job agent is still starting (a fresh or busy cluster answers
    'No available agent to submit job' for a while)."""
    import logging

    if not verbose:  # packaging chatter (what was excluded, upload URIs) is not the user's concern
        logging.getLogger("ray").setLevel(logging.ERROR)
    deadline = time.time() + patience_s
    while True:
        try:
            return c.submit_job(**sub)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise SubmitError(f"the cluster refused the job: {e}") from None
            time.sleep(2)


async def _follow(c, job_id: str, deadline: float) -> None:
    async for lines in c.tail_job_logs(job_id):
        print(lines, end="", flush=True)
        if time.time() > deadline:
            return


def wait_for(c, job_id: str, timeout_s: Optional[float], follow: bool = True) -> str:
    """Follow the logs until the job ends; past the timeout the job is stopped. Returns the final status."""
    deadline = time.time() + (timeout_s or float("inf"))
    if follow:
        try:
            asyncio.run(asyncio.wait_for(_follow(c, job_id, deadline),
                                         None if timeout_s is None else max(1.0, deadline - time.time())))
        except asyncio.TimeoutError:
            pass
        except Exception as e:  # the log stream broke (dashboard restart): fall back to polling the status
            print(f"[stemqa submit] log stream ended: {e}", file=sys.stderr)
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if time.time() > deadline:
            print(f"[stemqa submit] job {job_id} still {status} after {timeout_s:.0f} s: stopping it", file=sys.stderr)
            c.stop_job(job_id)
            stop_deadline = time.time() + 60
            while status not in TERMINAL and time.time() < stop_deadline:
                time.sleep(1)
                status = str(c.get_job_status(job_id).value)
            return "TIMEOUT"
        time.sleep(1)


def exit_code(status: str) -> int:
    return {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, "TIMEOUT": 124}.get(status, 1)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="stemqa submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options not listed here are passed to the stage (e.g. --model, --out, --no-serve).")
    p.add_argument("stage", help=f"what to run: {', '.join(stages())}")
    p.add_argument("--config", "--preset", dest="config", default="demo", help="preset name or YAML file in the repo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="config override, as for every stage (repeatable)")
    p.add_argument("--address", default=None, help="Ray dashboard URL (default: $RAY_ADDRESS or the local cluster)")
    p.add_argument("--run", default=None, help="run directory for the stage (made absolute)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    p.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds (exit 124)")
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray's raysubmit_...)")
    p.add_argument("--pip", action="store_true",
                   help="install the pinned requirements of pyproject.toml in the job's env (clusters without them)")
    p.add_argument("--verbose", action="store_true", help="show Ray's packaging and upload messages")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0, help="GPUs reserved for the job's driver")
    args, extra = p.parse_known_args(argv)
    try:
        sub = build_submission(args, extra)
        c = client(args.address)
        job_id = submit_with_retry(c, sub, args.verbose)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"job {job_id} submitted: {sub['entrypoint']}", flush=True)
    if args.no_wait:
        print(f"follow it: stemqa jobs --address {args.address or default_address()}; stop it: stemqa stop {job_id}")
        return 0
    status = wait_for(c, job_id, args.timeout)
    info = c.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
          flush=True)
    return exit_code(status)


def _fmt_time(ms: Optional[int]) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def list_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="stemqa jobs", description="List the Ray jobs on a cluster and their status.")
    p.add_argument("--address", default=None, help="Ray dashboard URL (default: $RAY_ADDRESS or the local cluster)")
    args = p.parse_args(argv)
    try:
        jobs = client(args.address).list_jobs()
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = sorted(jobs, key=lambda j: j.start_time or 0)
    print(f"{'job id':<28} {'status':<10} {'started':<19}  entrypoint")
    for j in jobs:
        entry = j.entrypoint if len(j.entrypoint) <= 100 else j.entrypoint[:97] + "..."
        print(f"{(j.submission_id or j.job_id or '-'):<28} {j.status.value:<10} {_fmt_time(j.start_time):<19}  {entry}")
    return 0


def stop_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="stemqa stop", description="Stop a Ray job by id.")
    p.add_argument("job_id")
    p.add_argument("--address", default=None, help="Ray dashboard URL (default: $RAY_ADDRESS or the local cluster)")
    p.add_argument("--wait", type=float, default=30, help="seconds to wait for the job to stop (default 30)")
    args = p.parse_args(argv)
    try:
        c = client(args.address)
        c.get_job_status(args.job_id)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the dashboard answers 404 for an unknown id
        print(f"error: job {args.job_id}: {e}", file=sys.stderr)
        return 2
    c.stop_job(args.job_id)
    deadline, status = time.time() + args.wait, ""
    while time.time() < deadline:
        status = str(c.get_job_status(args.job_id).value)
        if status in TERMINAL:
            break
        time.sleep(0.5)
    print(f"job {args.job_id}: {status}")
    return 0 if status in TERMINAL else 1


if __name__ == "__main__":
    sys.exit(main())
