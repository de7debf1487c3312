"""Check the cluster definitions before `ray up` / `kubectl apply`; every error names the field's path.

    python cluster/validate.py cluster/aws.yaml cluster/kuberay/*.yaml

- Launcher YAML: the JSON schema Ray ships (ray/autoscaler/ray-schema.json, what `ray up` validates against),
  then our own rules (CPU head, GPU workers with min <= max, dashboard on 127.0.0.1, only SSH open).
- KubeRay manifests: a hand-written JSON schema of the fields these manifests use, with the names, types and
  required fields of the ray.io/v1 CRDs' openAPIV3Schema (ray-project/kuberay,
  ray-operator/config/crd/bases/ray.io_*.yaml; the full CRDs are 1 MB each and not shipped in any installed
  package), then our rules (GPU limits on GPU groups, autoscaling bounds, nothing public, the RayJob's and
  RayService's cluster specs identical to raycluster.yaml, their stemqa config loading).
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]

# --- KubeRay: the subset of the CRD schema we rely on -----------------------------------------------------
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}
RESOURCES = {"type": "object", "properties": {
    "requests": {"type": "object", "additionalProperties": QUANTITY},
    "limits": {"type": "object", "additionalProperties": QUANTITY}}, "additionalProperties": False}
CONTAINER = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
              "properties": {"containerPort": {"type": "integer"}, "name": {"type": "string"}}}},
    "resources": RESOURCES,
    "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["mountPath", "name"]}}}}
POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "items": {"type": "object"}},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}}}
# rayStartParams values are strings in the CRD ("0", not 0): a common mistake kubectl would reject
RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
RAY_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "rayVersion": {"type": "string"},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": INT32, "image": {"type": "string"}, "resources": RESOURCES}},
    "headGroupSpec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
        "enableIngress": {"type": "boolean"}, "serviceType": {"type": "string"},
        "rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE}},
    "workerGroupSpecs": {"type": "array", "items": {
        "type": "object", "required": ["groupName", "template"], "additionalProperties": False, "properties": {
            "groupName": {"type": "string"}, "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32,
            "rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE}}}}}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


def _resource(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec}}


KUBERAY_SCHEMAS = {
    "RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": _resource("RayJob", {"type": "object", "required": ["entrypoint"], "additionalProperties": False,
                                   "properties": {
        "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": INT32,
        "activeDeadlineSeconds": INT32, "backoffLimit": INT32, "jobId": {"type": "string"},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "rayClusterSpec": RAY_CLUSTER_SPEC}}),
    "RayService": _resource("RayService", {"type": "object", "required": ["rayClusterConfig"],
                                           "additionalProperties": False, "properties": {
        "serveConfigV2": {"type": "string"}, "rayClusterConfig": RAY_CLUSTER_SPEC}}),
    "PersistentVolumeClaim": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"]},
}


def _path(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def schema_errors(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{_path(e)}: {e.message}" for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# --- the launcher YAML ------------------------------------------------------------------------------------

def launcher_errors(cfg: dict) -> list[str]:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = schema_errors(cfg, schema)
    if errors:
        return errors
    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    if head not in types:
        return [f"head_node_type: {head!r} is not one of available_node_types ({', '.join(types)})"]
    if types[head]["resources"].get("GPU", 0):
        errors.append(f"available_node_types.{head}.resources.GPU: the head is a CPU node")
    gpu_types = [n for n, t in types.items() if n != head and t["resources"].get("GPU", 0) > 0]
    if not gpu_types:
        errors.append("available_node_types: no GPU worker type")
    for name in gpu_types:
        t = types[name]
        if t.get("min_workers", 0) > t.get("max_workers", 0):
            errors.append(f"available_node_types.{name}.min_workers: above max_workers")
    start = " ".join(cfg.get("head_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in start:
        errors.append("head_start_ray_commands: the dashboard must bind 127.0.0.1 (--dashboard-host=127.0.0.1)")
    for i, perm in enumerate(cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", [])):
        if (perm.get("FromPort"), perm.get("ToPort")) != (22, 22):
            errors.append(f"provider.security_group.IpPermissions.{i}: only SSH (22) may be opened")
    return errors


# --- KubeRay manifests ------------------------------------------------------------------------------------

def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s.get("rayClusterSpec"),
            "RayService": lambda s: s.get("rayClusterConfig")}[doc["kind"]](doc["spec"])


def _cluster_rules(spec: dict, where: str) -> list[str]:
    errors = []
    head = spec["headGroupSpec"]
    if head.get("enableIngress") or head.get("serviceType") in ("LoadBalancer", "NodePort"):
        errors.append(f"{where}.headGroupSpec: the head service must stay internal (no Ingress / LoadBalancer / NodePort)")
    for c in head["template"]["spec"]["containers"]:
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}):
            errors.append(f"{where}.headGroupSpec: the head is a CPU pod")
    if spec.get("workerGroupSpecs") and not spec.get("enableInTreeAutoscaling"):
        errors.append(f"{where}.enableInTreeAutoscaling: must be true for autoscaling worker groups")
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        at = f"{where}.workerGroupSpecs.{i}"
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 0)
        if not lo <= n <= hi:
            errors.append(f"{at}: need minReplicas <= replicas <= maxReplicas, got {lo} <= {n} <= {hi}")
        for j, c in enumerate(g["template"]["spec"]["containers"]):
            limits = c.get("resources", {}).get("limits", {})
            if "gpu" in g["groupName"] and not limits.get("nvidia.com/gpu"):
                errors.append(f"{at}.template.spec.containers.{j}.resources.limits: a GPU group needs nvidia.com/gpu")
    return errors


def _stemqa_command_errors(argv: list[str], where: str) -> list[str]:
    """The RayJob's entrypoint must be a stemqa command whose config loads (presets, --set overrides)."""
    from stemqa.cli import COMMANDS
    from stemqa.config import ConfigError, load_config

    if argv[:3] != ["python", "-m", "stemqa.cli"] or len(argv) < 4 or argv[3] not in COMMANDS:
        return [f"{where}: expected `python -m stemqa.cli <command> ...`, got {' '.join(argv[:4])!r}"]
    config = argv[argv.index("--config") + 1] if "--config" in argv else "demo"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    try:
        load_config(config, sets)
    except ConfigError as e:
        return [f"{where}: {e}"]
    return []


def _serve_config_errors(text: str, where: str) -> list[str]:
    from stemqa.config import ConfigError, load_config

    try:
        serve_cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{where}: not valid YAML: {e}"]
    errors = []
    for i, app in enumerate(serve_cfg.get("applications", [])):
        module, _, attr = app.get("import_path", "").partition(":")
        if not (ROOT / (module.replace(".", "/") + ".py")).exists() or f"def {attr}(" not in (
                ROOT / (module.replace(".", "/") + ".py")).read_text():
            errors.append(f"{where}.applications.{i}.import_path: {app.get('import_path')!r} not found in the repo")
        args = app.get("args", {})
        try:
            load_config(args.get("config") or "demo", args.get("set") or [])
        except ConfigError as e:
            errors.append(f"{where}.applications.{i}.args: {e}")
    return errors


def kuberay_errors(doc: dict, reference_cluster: dict | None = None) -> list[str]:
    kind = doc.get("kind")
    if kind not in KUBERAY_SCHEMAS:
        return [f"kind: {kind!r} is not one of {', '.join(KUBERAY_SCHEMAS)}"]
    errors = schema_errors(doc, KUBERAY_SCHEMAS[kind])
    if errors or kind == "PersistentVolumeClaim":
        return errors
    spec = _cluster_spec(doc)
    where = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}[kind]
    if spec is None:
        return [f"{where}: missing"]
    errors += _cluster_rules(spec, where)
    if reference_cluster is not None and kind != "RayCluster" and spec != reference_cluster:
        errors.append(f"{where}: differs from raycluster.yaml's spec (regenerate it)")
    if kind == "RayJob":
        errors += _stemqa_command_errors(shlex.split(doc["spec"]["entrypoint"]), "spec.entrypoint")
    if kind == "RayService":
        errors += _serve_config_errors(doc["spec"].get("serveConfigV2", ""), "spec.serveConfigV2")
    return errors


def validate_file(path: Path) -> list[str]:
    """Errors of one definition file (empty = valid); each starts with the file and the field's path."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        return [f"{path}: not valid YAML: {e}"]
    if "kuberay" not in path.parts:
        return [f"{path}: {e}" for e in launcher_errors(docs[0])]
    ref_file = path.parent / "raycluster.yaml"
    reference = yaml.safe_load(ref_file.read_text())["spec"] if ref_file.exists() and path != ref_file else None
    return [f"{path}: {e}" for d in docs for e in kuberay_errors(d, reference)]


def main(argv=None) -> int:
    files = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or (
        [ROOT / "cluster" / "aws.yaml"] + sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")))
    errors = [e for f in files for e in validate_file(f)]
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(files)} files, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
