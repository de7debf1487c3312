"""The cluster definitions (cluster/aws.yaml, cluster/kuberay/*.yaml) validate, and broken ones fail naming the field.

Launcher YAML: Ray's own schema (ray/autoscaler/ray-schema.json) and Ray's own `prepare_config` +
`validate_config` (what `ray up` runs). KubeRay: the hand-written subset of the ray.io/v1 CRD schemas in
cluster/validate.py (the CRDs themselves are not in any installed package).
"""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"

spec = importlib.util.spec_from_file_location("cluster_validate", ROOT / "cluster" / "validate.py")
validate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(validate)


def load(path):
    return yaml.safe_load(Path(path).read_text())


@pytest.fixture(scope="module")
def ray_schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_is_valid_for_ray_up(ray_schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(ROOT / "cluster" / "aws.yaml")
    jsonschema.validate(cfg, ray_schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's own checks after filling in its defaults
    assert validate.launcher_errors(cfg) == []
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpus = {t["labels"]["stemqa/gpu"]: t for n, t in types.items() if t["resources"].get("GPU")}
    assert set(gpus) == {"a100", "h100"}
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in gpus.values())
    assert any("pip install" in c and "stemqa" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("mutate, path", [
    (lambda c: c["available_node_types"]["gpu_a100"].__setitem__("min_workers", "two"),
     "available_node_types.gpu_a100.min_workers"),
    (lambda c: c["available_node_types"]["gpu_h100"]["resources"].__setitem__("GPU", -8),
     "available_node_types.gpu_h100.resources.GPU"),
    (lambda c: c["available_node_types"]["gpu_a100"].__setitem__("max_worker", 2),  # typo: unknown key
     "available_node_types.gpu_a100"),
    (lambda c: c.__setitem__("head_start_ray_commands", ["ray start --head --dashboard-host=0.0.0.0"]),
     "head_start_ray_commands"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
     "provider.security_group.IpPermissions.1"),
])
def test_broken_launcher_yaml_fails_with_the_field_path(mutate, path, ray_schema):
    cfg = load(ROOT / "cluster" / "aws.yaml")
    mutate(cfg)
    errors = validate.launcher_errors(cfg)
    assert errors and errors[0].startswith(path + ":"), errors


def test_kuberay_manifests_are_valid_and_consistent():
    files = sorted(KUBERAY.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "storage.yaml"}
    for f in files:
        assert validate.validate_file(f) == [], f
    cluster, job, service = (load(KUBERAY / n) for n in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"))
    assert job["spec"]["rayClusterSpec"] == cluster["spec"] == service["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu-a100", "gpu-h100"}
    for g in groups.values():
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= 1 and g["minReplicas"] == 0 < g["maxReplicas"]
    assert "pipeline" in job["spec"]["entrypoint"] and job["spec"]["shutdownAfterJobFinishes"] is True
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    scorer = next(d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == "Scorer")
    assert scorer["ray_actor_options"]["num_gpus"] == 1 and scorer["autoscaling_config"]["max_replicas"] > 1


@pytest.mark.parametrize("file, mutate, path", [
    ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
     "spec.headGroupSpec.rayStartParams.num-cpus"),  # the CRD wants strings here
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][1].__setitem__("maxReplicas", "four"),
     "spec.workerGroupSpecs.1.maxReplicas"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("minReplica", 1),
     "spec.workerGroupSpecs.0"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("replicas", 9),
     "spec.workerGroupSpecs.0"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].pop("nvidia.com/gpu"), "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].__setitem__("memory", "64 GB"), "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory"),
    ("rayjob.yaml", lambda d: d["spec"].pop("entrypoint"), "spec"),
    ("rayjob.yaml", lambda d: d["spec"].__setitem__("submissionMode", "K8sMode"), "spec.submissionMode"),
    ("rayjob.yaml", lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"] + " --set sft.lr=-1"),
     "spec.entrypoint"),  # the stemqa config it would run is invalid
    ("rayservice.yaml", lambda d: d["spec"].__setitem__("serveConfigV2", d["spec"]["serveConfigV2"].replace(
        "serve.app:app_builder", "serve.app:no_such_builder")), "spec.serveConfigV2.applications.0.import_path"),
])
def test_broken_kuberay_manifest_fails_with_the_field_path(file, mutate, path):
    doc = load(KUBERAY / file)
    mutate(doc)
    errors = validate.kuberay_errors(doc)
    assert errors and any(e.startswith(path + ":") for e in errors), errors


def test_validate_cli_reports_the_file_and_field(tmp_path):
    bad_dir = tmp_path / "kuberay"
    bad_dir.mkdir()
    doc = load(KUBERAY / "raycluster.yaml")
    doc["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    (bad_dir / "raycluster.yaml").write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, str(ROOT / "cluster" / "validate.py"), str(bad_dir / "raycluster.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"{bad_dir / 'raycluster.yaml'}: spec.autoscalerOptions.upscalingMode: 'Fast' is not one of" in out.stderr
