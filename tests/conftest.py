"""Shared fixtures: a private local Ray instance, the real two-node local cluster, models and data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import stemqa.ray_utils

stemqa.ray_utils.load_cluster_env()  # first: a local cluster's client env, before anything imports ray

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STEMQA_DATA_ROOT", ROOT.parent / "shared" / "data"))
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots and other outputs tests keep (git-ignored)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def full_data(root: Path) -> bool:
    """Whether `root` is the real data (../shared/data), not the packaged sample: counts of whole files differ."""
    return Path(root).resolve() == SHARED_DATA.resolve() and (SHARED_DATA / "mcq").is_dir()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: the CPU is shared with other test processes, and 2 threads per process
    oversubscribe it (several x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data (../shared/data, or $STEMQA_DATA_ROOT); where it is absent (a clone elsewhere), the
    packaged sample of the same layout, so the tests run instead of skipping."""
    if (SHARED_DATA / "mcq").is_dir():
        return SHARED_DATA
    from stemqa.data.paths import SAMPLE_DATA

    return SAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny random Qwen3 (built once and cached)."""
    from stemqa.models import resolve_model

    return str(resolve_model("tiny-qwen3"))


@pytest.fixture(scope="session")
def smollm2() -> str:
    from stemqa.models import resolve_model

    return str(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance (2 CPUs) for the whole session; start-up costs 5-10 s."""
    import ray

    from stemqa.ray_utils import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray("local", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """The real two-node cluster from cluster/local.sh (head + worker node), on ports of its own."""
    # a short directory: Ray's unix sockets live under it and their paths may not exceed 107 bytes
    cluster_dir = tempfile.mkdtemp(prefix="sqc", dir="/tmp")
    env = dict(os.environ, STEMQA_CLUSTER_DIR=cluster_dir,
               STEMQA_RAY_PORT=os.environ.get("STEMQA_TEST_RAY_PORT", "6410"),
               STEMQA_DASHBOARD_PORT=os.environ.get("STEMQA_TEST_DASHBOARD_PORT", "8276"),
               RAY=str(Path(sys.executable).parent / "ray"))
    out = subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "start"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # the cluster's client settings (token auth) for the ray CLI, ray.init and job submission
    env_file = Path(env["STEMQA_CLUSTER_DIR"]) / "env"
    env.update(stemqa.ray_utils.read_env_file(env_file))
    address = out.stdout.strip().splitlines()[-1]
    yield {"address": address, "dashboard": f"http://127.0.0.1:{env['STEMQA_DASHBOARD_PORT']}", "env": env}
    subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "stop"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def submit_job(local_cluster):
    """`ray job submit --working-dir . -- python -m <args>` to the local cluster, as a user would; returns the logs.

    `ray job submit` follows the job's logs and exits non-zero when the job fails, so a failed job fails the
    test with its last lines; the timeout bounds it, so it never hangs."""
    env = dict(local_cluster["env"], RAY_ADDRESS=local_cluster["dashboard"])

    def submit(*args: str, timeout: int = 900) -> str:
        out = subprocess.run([env["RAY"], "job", "submit", "--working-dir", str(ROOT), "--", "python", "-m", *args],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        logs = out.stdout + out.stderr
        assert out.returncode == 0, logs[-5000:]
        return logs

    return submit
