"""The driver as a Ray job runs it: the job's runtime env (the shipped cluster/runtime_env.yaml) merged with what
init_ray forwards, by Ray's own merge; and a relative run.root refused inside the job's temporary working dir."""

import json
import os
from pathlib import Path

import pytest
import yaml
from ray.runtime_env.runtime_env import _merge_runtime_env

from dpo_ray.config import ConfigError, load_config
from dpo_ray.cluster import _FORWARDED_ENV, check_run_root, forwarded_env, init_ray, joins_a_cluster

REPO = Path(__file__).resolve().parent.parent
SHIPPED = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
# The KubeRay job's runtime env, as the operator hands it to `ray job submit`.
RAYJOB = yaml.safe_load(yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())["spec"]["runtimeEnvYAML"])


def _job_driver_environ(runtime_env: dict) -> dict:
    # What Ray's JobSupervisor gives the entrypoint: the job's env vars, and the job config as JSON.
    uploaded = {**runtime_env, "working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}
    return {**runtime_env.get("env_vars", {}), "HF_HUB_OFFLINE": "1",
            "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": uploaded, "metadata": {}})}


@pytest.mark.parametrize("shipped", [SHIPPED, RAYJOB], ids=["runtime_env.yaml", "rayjob.yaml"])
def test_the_shipped_runtime_env_merges_with_what_the_driver_forwards(shipped):
    environ = _job_driver_environ(shipped)
    # On a launcher cluster each node's `ray start` sets the tracking URI (gpu-cluster.yaml): the driver has it too.
    environ.setdefault("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert set(shipped["env_vars"]) & set(_FORWARDED_ENV)  # the conflict this guards against is real
    driver = {"env_vars": forwarded_env(environ)}
    merged = _merge_runtime_env(json.loads(environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["runtime_env"], driver)
    assert merged is not None, "Ray would refuse: Failed to merge the Job's runtime env"
    assert merged["env_vars"] == {"MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", **shipped["env_vars"],
                                  "HF_HUB_OFFLINE": "1"}


def test_outside_a_job_every_forwarded_variable_goes_to_the_workers():
    environ = {"DPO_RAY_CACHE": "/c", "MLFLOW_TRACKING_URI": "http://x:5000", "PATH": "/bin"}
    assert forwarded_env(environ) == {"DPO_RAY_CACHE": "/c", "MLFLOW_TRACKING_URI": "http://x:5000"}


def test_a_relative_run_root_is_refused_in_a_job_with_a_working_dir():
    environ = _job_driver_environ(SHIPPED)
    with pytest.raises(ConfigError, match=r"^run\.root: 'runs' is relative, and this Ray job runs in Ray's temporary"):
        check_run_root(load_config(None, ["run.root=runs"]), environ)
    check_run_root(load_config(None, ["run.root=/shared/runs"]), environ)
    check_run_root(load_config(None, ["run.root=runs"]), {})  # not a job: relative to the current directory


def test_only_a_driver_that_joins_a_cluster_forwards_its_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert not joins_a_cluster(None) and not joins_a_cluster("local")
    assert joins_a_cluster("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert joins_a_cluster(None)


@pytest.mark.slow
def test_a_local_cluster_gets_no_runtime_env_and_its_workers_inherit_the_drivers_env(monkeypatch, tmp_path):
    """A runtime env would make Ray start a fresh process for each task and actor of the local cluster; its workers
    see the driver's settings without one, since the cluster is started by this process."""
    import ray

    monkeypatch.setenv("DPO_RAY_CACHE", str(tmp_path))
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    ray.shutdown()
    try:
        init_ray(load_config("configs/tiny.yaml", ["run.ray_address=local"]))
        assert ray.get_runtime_context().runtime_env == {}
        seen = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in ("DPO_RAY_CACHE", "TOKENIZERS_PARALLELISM")})
                       .remote())
        assert seen == {"DPO_RAY_CACHE": str(tmp_path), "TOKENIZERS_PARALLELISM": "false"}
    finally:
        ray.shutdown()
