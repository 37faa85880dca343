"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), the tiny pipeline
submitted with `ray job submit`, and proof that its work ran on both nodes."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def two_node_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # this process connects to the cluster too
    # Ray 2.60 turns token authentication on for `ray start --head`; a second `ray start` on the same machine
    # would need the token passed along. This cluster only listens on 127.0.0.1 and lives for one test.
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    port, dashboard = _free_port(), _free_port()
    # Short: Ray's Unix socket paths under the temp dir must stay under the 107-character limit.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    worker_temp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    head = [RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--include-dashboard=true"]
    subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
    try:
        # Its own temp dir, as a real second machine has: sharing the head's would also share the unpacked
        # job working_dir, which either node's runtime-env agent may delete under the running driver.
        worker = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                  f"--temp-dir={worker_temp}"]
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", env
    finally:
        # Not `ray stop`: it would stop every Ray instance on the machine, not just this cluster.
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and (str(temp) in cmdline or str(worker_temp) in cmdline
                                            or f"127.0.0.1:{port}" in cmdline):
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(worker_temp, ignore_errors=True)


def test_pipeline_as_a_ray_job_on_two_nodes(two_node_cluster, tmp_path):
    dashboard, gcs, env = two_node_cluster
    import ray

    ray.init(address=gcs)
    try:
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(1)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    finally:
        ray.shutdown()

    submit = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps({"excludes": [".venv*", "runs", ".git"]}), "--",
              sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", f"run.root={tmp_path / 'runs'}",
              "data.num_train_prompts=16"]
    proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    assert (tmp_path / "runs" / "tiny" / "evaluate" / "manifest.json").is_file()

    from ray.util.state import list_tasks

    tasks = list_tasks(address=dashboard, limit=10_000, detail=True, raise_on_missing_output=False)
    nodes = {t.node_id for t in tasks if t.node_id}
    assert len(nodes) == 2, f"work ran on {len(nodes)} node(s)"
