"""The cluster files in cluster/, checked against the schemas of the tools that read them.

- gpu-cluster.yaml: Ray's cluster launcher schema, through Ray's own prepare_config + validate_config;
- rayjob.yaml: the KubeRay v1.7.0 RayJob CRD (tests/data/README.md), strictly: an unknown field is an error, as
  kubectl's strict field validation makes it;
- mlflow.yaml: the Kubernetes built-in kinds, with the strict schemas of the kubernetes-validate package;
- the flags the manifests pass to `ray start` and `mlflow server`: the options those commands declare;
- Dockerfile and image tags: the Ray and Python versions the project pins, the project's version as the tag.
Nothing here reaches a cloud or a Kubernetes cluster; what that leaves unverified is said in cluster/README.md.
"""

import copy
import gzip
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
RAYJOB_CRD = Path(__file__).parent / "data" / "kuberay-v1.7.0-ray.io_rayjobs.yaml.gz"
KUBERNETES = "1.33.0"  # the oldest Kubernetes minor still supported upstream when these manifests were written
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ------------------------------------------------------------------------------------------ Ray cluster launcher

def _launcher_errors(config: dict) -> str | None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError) as e:
        return str(e).splitlines()[0]
    return None


def test_launcher_config_passes_rays_own_validation():
    assert _launcher_errors(_load("gpu-cluster.yaml")) is None


def test_launcher_validation_catches_a_misspelled_key():
    config = _load("gpu-cluster.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = config["available_node_types"]["gpu_worker"].pop(
        "max_workers")
    assert _launcher_errors(config) is not None


def test_launcher_keeps_rays_default_setup_lines():
    # Ray's AWS defaults, which a config's own lists replace rather than extend: boto3 for the head's autoscaler,
    # the open-files limit and the fixed object-manager port on every `ray start`.
    config = _load("gpu-cluster.yaml")
    assert any("boto3" in c for c in config["head_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1 and "ulimit -n 65536" in start[0] and "--object-manager-port=8076" in start[0], key
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0


# ------------------------------------------------------------------------------------------------- KubeRay RayJob

def _strict(schema: dict) -> dict:
    """A Kubernetes structural schema as plain JSON Schema that refuses unknown fields (kubectl's strict field
    validation): objects with `properties` get additionalProperties false unless they preserve unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(RAYJOB_CRD.read_bytes()))
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def _rayjob_errors(schema: dict, manifest: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_rayjob_matches_the_kuberay_v1_crd(rayjob_schema):
    manifest = _load("rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    assert _rayjob_errors(rayjob_schema, manifest) == []


@pytest.mark.parametrize("path, value", [
    (["spec", "shutdownAfterJobFinish"], True),  # misspelled: the operator would ignore it and keep the cluster
    (["spec", "rayClusterSpec", "enableInTreeAutoscaling"], "yes"),
    (["spec", "rayClusterSpec", "autoscalerOptions", "upscalingMode"], "Fast"),
    (["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resource"], {}),
])
def test_rayjob_check_catches_what_kubectl_would_refuse(rayjob_schema, path, value):
    manifest = _load("rayjob.yaml")
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _rayjob_errors(rayjob_schema, manifest)


def test_rayjob_autoscales_and_pins_the_image():
    spec = _load("rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    # minReplicas/maxReplicas only take effect with the operator's autoscaler turned on.
    assert cluster["enableInTreeAutoscaling"] is True
    group = cluster["workerGroupSpecs"][0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    images = [c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]]
    assert images and all(i.endswith(f"/dpo-ray:{PROJECT['version']}") for i in images), images


# --------------------------------------------------------------------------------- Kubernetes built-in kinds

def test_mlflow_manifests_match_the_kubernetes_schemas():
    documents = list(yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text()))
    assert sorted(d["kind"] for d in documents) == ["Deployment", "PersistentVolumeClaim", "Service"]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_kubernetes_check_catches_a_misspelled_field():
    deployment = next(d for d in yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text()) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["mlflow"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_rayjob_logs_to_the_shipped_mlflow_service():
    service = next(d for d in yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text()) if d["kind"] == "Service")
    env = yaml.safe_load(_load("rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    port = service["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"
    deployment = next(d for d in yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text()) if d["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert f"{service['metadata']['name']}:{port}" in allowed  # the Host header the Ray workers send


def _auth_settings(launcher: dict, rayjob: dict, mlflow_docs: list[dict]) -> dict[str, bool]:
    """Whether each manifest keeps Ray's token auth and MLflow's basic auth on, and where credentials come from."""
    mlflow_deployment = next(d for d in mlflow_docs if d["kind"] == "Deployment")
    deployment = mlflow_deployment["spec"]["template"]["spec"]["containers"][0]
    def secret_env(container: dict) -> set[str]:
        return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}

    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    containers = [g["template"]["spec"]["containers"][0] for g in groups]
    sourced = ". ~/.dpo-ray/cluster.env"
    starts = launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]
    (server,) = [c for c in launcher["head_setup_commands"] if "mlflow server" in c]
    return {
        "launcher: token and credentials copied to every node": set(launcher["file_mounts"]) >= {
            "~/.ray/auth_token", "~/.dpo-ray/cluster.env"},
        "launcher: every ray start sources cluster.env": all(sourced in c for c in starts),
        "launcher: mlflow server with basic auth": "--app-name basic-auth" in server and sourced in server,
        "rayjob: token auth": cluster.get("authOptions", {}).get("mode") == "token",
        "rayjob: MLflow credentials from the Secret": all(
            secret_env(c) >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} for c in containers),
        "rayjob: no credential in the job's config": "PASSWORD" not in rayjob["spec"]["runtimeEnvYAML"],
        "mlflow.yaml: basic auth": "basic-auth" in deployment["command"][1:]
        and deployment["command"][deployment["command"].index("basic-auth") - 1] == "--app-name",
        "mlflow.yaml: admin and CSRF key from the Secret": secret_env(deployment) >= {
            "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"},
    }


def _manifests() -> tuple[dict, dict, list[dict]]:
    return (_load("gpu-cluster.yaml"), _load("rayjob.yaml"),
            list(yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text())))


def test_the_manifests_require_authentication():
    # Unauthenticated, the jobs API on 8265 runs anyone's code and MLflow on 5000 serves and deletes every run.
    settings = _auth_settings(*_manifests())
    assert all(settings.values()), [k for k, ok in settings.items() if not ok]


@pytest.mark.parametrize("weaken", ["launcher_mount", "rayjob_auth", "mlflow_app", "rayjob_password_inline"])
def test_the_authentication_check_sees_a_weakened_manifest(weaken):
    launcher, rayjob, mlflow_docs = _manifests()
    if weaken == "launcher_mount":
        del launcher["file_mounts"]["~/.ray/auth_token"]
    elif weaken == "rayjob_auth":
        del rayjob["spec"]["rayClusterSpec"]["authOptions"]
    elif weaken == "mlflow_app":
        deployment = next(d for d in mlflow_docs if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container["command"] = [w for w in container["command"] if w not in ("--app-name", "basic-auth")]
    else:
        rayjob["spec"]["runtimeEnvYAML"] += "  MLFLOW_TRACKING_PASSWORD: hunter2hunter2\n"
    assert not all(_auth_settings(launcher, rayjob, mlflow_docs).values())


# ----------------------------------------------------------------------------- flags the manifests pass to tools

def _declared_options(command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def _flags(line: str, program: str) -> list[str]:
    """The --options given to `program` on a shell line (its words up to the next shell operator)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, words = [], []
    for token in lexer:
        if set(token) <= set(";&|<>()"):
            segments.append(words)
            words = []
        else:
            words.append(token)
    segments.append(words)
    name, flags = program.split(), []
    for words in segments:
        starts = [i for i in range(len(words)) if words[i:i + len(name)] == name]
        if starts:
            flags += [w.split("=", 1)[0] for w in words[starts[0] + len(name):] if w.startswith("--")]
    return flags


def _launcher_and_kubernetes_commands() -> list[str]:
    launcher = _load("gpu-cluster.yaml")
    lines = [c for key in ("head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
             for c in launcher[key]]
    mlflow = next(d for d in yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text()) if d["kind"] == "Deployment")
    lines.append(shlex.join(mlflow["spec"]["template"]["spec"]["containers"][0]["command"]))
    return lines


def test_flags_given_to_ray_start_and_mlflow_server_exist():
    from mlflow.cli import server
    from ray.scripts.scripts import start

    used = {"ray start": set(), "mlflow server": set()}
    for line in _launcher_and_kubernetes_commands():
        for program, flags in used.items():
            flags.update(_flags(line, program))
    assert used["ray start"] and used["mlflow server"]
    assert used["ray start"] <= _declared_options(start), used["ray start"] - _declared_options(start)
    assert used["mlflow server"] <= _declared_options(server), used["mlflow server"] - _declared_options(server)
    # KubeRay passes rayStartParams to `ray start` as --key=value.
    cluster = _load("rayjob.yaml")["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert {f"--{k}" for k in group["rayStartParams"]} <= _declared_options(start)


def test_flag_check_sees_a_misspelled_flag():
    assert _flags("ulimit -n 1; ray start --head --dashbord-host=0.0.0.0 > log", "ray start") == \
        ["--head", "--dashbord-host"]
    assert _flags("nohup mlflow server --host 0.0.0.0 & ray stop --force", "mlflow server") == ["--host"]


# ------------------------------------------------------------------------------------------- image and versions

def _pinned_ray_version() -> str:
    (ray,) = [d for d in PROJECT["dependencies"] if d.startswith("ray[")]
    return re.search(r"==([\d.]+)", ray).group(1).rstrip(".") + ".0"


def test_dockerfile_base_image_matches_the_pinned_ray_and_python():
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    python = "py" + "".join(PROJECT["requires-python"].removeprefix(">=").split(".")[:2])
    assert base == f"rayproject/ray:{_pinned_ray_version()}-{python}-gpu"
    assert sys.version_info[:2] == (3, 11)  # the Python the image's tag names, and this environment's
