"""Connecting to Ray the same way everywhere (CLI, jobs, tests), quietly and with settings for small machines.

`load_cluster_env()`: the local cluster's client settings (token auth) into os.environ. Ray reads them when it is
imported, so entry points (the CLI, tests, benchmarks) call it before anything imports ray; importing this
module changes nothing.

`init_ray(address)`:
- address None: the cluster started by `cluster/local.sh` when one runs (RAY_ADDRESS or its address file),
  else a private local Ray instance sized to this machine.
- "auto" / "ray://..." / "host:port": that cluster.
Inside a `ray job submit` job, RAY_ADDRESS is set by Ray and used.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

# Measured on 2-CPU machines (shared/notes/ray-on-small-machines.md): Ray Train polls worker reports every 2 s
# unless this is lowered, which dominated short runs; the preemption watcher logs a spurious error line.
WORKER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}



def local_cluster_dir() -> Path:
    """Where cluster/local.sh keeps the running local cluster's address, dashboard URL and client env."""
    return Path(os.environ.get("STEMQA_CLUSTER_DIR", "/tmp/stemqa-cluster"))


def read_env_file(path) -> dict[str, str]:
    """`export KEY=VALUE` lines (the env file cluster/local.sh writes; `source` it in a shell)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def load_cluster_env() -> None:
    """Client settings (token auth) that cluster/local.sh writes beside its address, into os.environ.

    Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH when `ray` is imported, so entry points call this before any
    import of ray (this module imports ray lazily). The user's own env wins.
    """
    env_file, address = local_cluster_dir() / "env", local_cluster_dir() / "address"
    if address.exists() and env_file.exists():
        for key, value in read_env_file(env_file).items():
            os.environ.setdefault(key, value)


def local_cluster_address() -> Optional[str]:
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    address = local_cluster_dir() / "address"
    if address.exists():
        return address.read_text().strip() or None
    return None


def quiet_ray_logs() -> None:
    for name in ("ray", "ray.train", "ray.tune", "ray.serve", "ray._private"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data warns that progress bars are off, which is what quiet asks for, and logs each finished dataset
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
        ctx.print_on_execution_start = False
    except Exception:  # older/newer Ray without one of these knobs: logs only
        pass


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = True,
             working_dir: Optional[str] = None):
    """Connect to (or start) Ray with stemqa's worker environment; returns the address used."""
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    if quiet:
        # The driver's core worker logs at ERROR level things that are not errors of ours (e.g. Ray Data's
        # actor pools: "constructor arguments in the object store and max_restarts > 0"); task and actor
        # failures still reach the driver as exceptions, and workers keep their own logs.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        # Ray Data re-applies its own logging config when it is first used, over any level set here; its env
        # var wins over that config ("Dataset ... execution finished" INFO lines, the progress-bar warning)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray  # after the env above, which Ray reads when it starts

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or local_cluster_address() or "local"
    kwargs = dict(log_to_driver=not quiet, configure_logging=True,
                  logging_level=logging.WARNING if quiet else logging.INFO)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # Inside a submitted job the job's runtime env stays as it is: a driver runtime env merged into it is a
        # different env, and Ray then deletes and re-extracts the job's working dir under the running driver
        # (its cwd goes stale: "[Errno 2] No such file or directory" on the next import). The worker env vars
        # come from the job (stemqa submit) or from the cluster's own environment (cluster/local.sh).
        runtime_env = {"env_vars": dict(WORKER_ENV)}
        if working_dir:
            runtime_env["working_dir"] = working_dir
        kwargs["runtime_env"] = runtime_env
    if address == "local":  # a private instance; the dashboard stays on (see ray-on-small-machines notes)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", **kwargs)
    else:
        ray.init(address=address, **kwargs)
    if quiet:
        quiet_ray_logs()
    return ray.get_runtime_context().gcs_address


def cpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
