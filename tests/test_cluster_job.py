"""A multi-node rehearsal on this machine, as cluster/ documents a GPU cluster, with only host names, paths and a
small config substituted:

- a head and two worker nodes (`ray start`), each with its own --temp-dir; one worker offers a custom `sampler`
  resource, the other `trainer`, and the config asks for them, so placement is forced across nodes;
- the secrets block of cluster/README.md run as written (with HOME in a temporary folder): Ray's token and the
  MLflow credentials, given to every node's `ray start` as gpu-cluster.yaml does (RAY_AUTH_MODE=token);
- a real `mlflow server` started with gpu-cluster.yaml's own command line (basic-auth app, database on the head's
  disk, artifacts under the shared folder), and MLFLOW_TRACKING_URI set on each node's `ray start`, as that file
  does;
- a folder standing in for shared storage (`/shared` in cluster/);
- the pipeline submitted with `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .`.

It checks that the dashboard's jobs API and the MLflow server refuse a caller without credentials, that the job
succeeded, that the samplers and training workers ran on their nodes, that every output
and Ray Train checkpoint is under the shared run.root, that the MLflow server holds the parent run, the stage
runs, the per-step metrics and the trained policy, and that nothing stayed in Ray's temp dirs.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import doc_shell_blocks, mlflow_runs, runs_under, the_parent_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ("sample", "label", "reference", "train", "evaluate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _documented_mlflow_server(shared: Path, head_home: Path, port: int) -> list[str]:
    """gpu-cluster.yaml's `mlflow server` command, with this machine's host, port and paths."""
    launcher = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    (line,) = [c for c in launcher["head_setup_commands"] if "mlflow server" in c]
    command = re.search(r"mlflow server .*?(?=\s*>)", line).group(0)
    command = (command.replace("--host 0.0.0.0", "--host 127.0.0.1").replace("--port 5000", f"--port {port}")
               .replace("$HOME", str(head_home)).replace("/shared", str(shared)))
    return [str(BIN / "mlflow"), *command.split()[1:]]


def _documented_secrets(home: Path) -> dict[str, str]:
    """cluster/README.md's secrets block run as written with HOME=`home`: the variables of ~/.dpo-ray/cluster.env,
    and RAY_AUTH_TOKEN_PATH naming the token it made (each node of a real cluster has it at ~/.ray/auth_token)."""
    (block,) = [b["text"] for b in doc_shell_blocks(REPO / "cluster" / "README.md")
                if "ray get-auth-token" in b["text"]]
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-e", "-c", block], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    lines = (home / ".dpo-ray" / "cluster.env").read_text().splitlines()
    assert (home / ".dpo-ray" / "cluster.env").stat().st_mode & 0o077 == 0  # readable by its owner only
    return {**dict(line.split("=", 1) for line in lines), "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}


def _ask_cluster(env: dict, code: str):
    """Run `code` (which sets `answer`) in a new Python process with `env`; its answer, through JSON."""
    script = f"import json, time\nimport ray\n{code}\nprint(json.dumps(answer))"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _status(url: str, seconds: float = 60) -> int:
    """The HTTP status `url` answers with, once its server listens."""
    deadline = time.time() + seconds
    while True:
        try:
            return urllib.request.urlopen(url, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code
        except urllib.error.URLError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture()
def rehearsal(tmp_path, monkeypatch):
    shared, head_home = tmp_path / "shared", tmp_path / "head"
    (head_home / "mlflow").mkdir(parents=True)
    shared.mkdir()
    secrets = _documented_secrets(head_home)
    for name, value in secrets.items():  # this process reads the MLflow server too
        monkeypatch.setenv(name, value)
    mlflow_port, gcs, dashboard = _free_port(), _free_port(), _free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, **secrets, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           # The job's `python` is the one on PATH where `ray start` ran (the README's activated venv).
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking}
    env.pop("RAY_ADDRESS", None)
    # In ~/mlflow, as gpu-cluster.yaml starts it: the basic-auth app keeps its users in ./basic_auth.db.
    mlflow = subprocess.Popen(_documented_mlflow_server(shared, head_home, mlflow_port), env=env,
                              cwd=head_home / "mlflow", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    # Short: Ray's Unix socket paths under the temp dir must stay under the 107-character limit.
    temps = [Path(tempfile.mkdtemp(prefix=f"r{i}", dir="/tmp")) for i in range(3)]
    common = ["--node-ip-address=127.0.0.1", "--dashboard-agent-listen-port=0"]  # three agents on one machine
    nodes = [
        ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=1",
         "--include-dashboard=true"],
        [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"sampler": 2}'],
        [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"trainer": 2}'],
    ]
    try:
        for temp, args in zip(temps, nodes):
            subprocess.run([str(BIN / "ray"), "start", *args, *common, f"--temp-dir={temp}"], check=True, env=env,
                           capture_output=True, timeout=180)
        _wait_for(f"{tracking}/health", 120)
        assert (head_home / "mlflow" / "basic_auth.db").is_file()
        yield {"shared": shared, "head_home": head_home, "dashboard": f"http://127.0.0.1:{dashboard}",
               "gcs": f"127.0.0.1:{gcs}", "tracking": tracking, "temps": temps, "env": env}
    finally:
        # Not `ray stop`: it would stop every Ray instance on the machine, not just this cluster.
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and (any(str(t) in cmdline for t in temps) or f"127.0.0.1:{gcs}" in cmdline):
                proc.kill()
        os.killpg(mlflow.pid, 9)
        mlflow.wait(timeout=30)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def test_multi_node_rehearsal_of_the_documented_cluster_run(rehearsal, tmp_path):
    c = rehearsal
    shared = c["shared"]
    # Asked from a fresh process with the nodes' environment, as a user's shell would: Ray reads RAY_AUTH_MODE and
    # its token once per process, so this test process (which earlier tests may have used Ray in) cannot switch.
    nodes = _ask_cluster(c["env"], f"""
deadline = time.time() + 60
ray.init(address="{c['gcs']}")
while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.time() < deadline:
    time.sleep(1)
answer = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
""")
    assert len(nodes) == 3
    sampler_node = next(i for i, r in nodes.items() if "sampler" in r)
    trainer_node = next(i for i, r in nodes.items() if "trainer" in r)

    # Without the token or the MLflow password, nothing answers: no job can be submitted, no run read.
    without = {k: v for k, v in c["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_PASSWORD")}
    assert _status(f"{c['dashboard']}/api/jobs/") == 401
    assert _status(f"{c['tracking']}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", c["dashboard"]], env=without,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout

    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text((REPO / "cluster" / "runtime_env.yaml").read_text().replace("/shared", str(shared)))
    run_root = shared / "runs"
    submit = [str(BIN / "ray"), "job", "submit", "--address", c["dashboard"], "--runtime-env", str(runtime_env),
              "--working-dir", ".", "--", "python", "pipelines/full.py",
              # The small config, and the custom resources that place each stage on its node.
              "--config", "configs/tiny.yaml", f"run.root={run_root}", "data.num_train_prompts=16",
              "sample.resources={sampler: 1}", "reference.resources={sampler: 1}", "train.resources={trainer: 1}",
              "train.num_workers=2"]
    proc = subprocess.run(submit, cwd=REPO, env=c["env"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout

    actors = _ask_cluster(c["env"], f"""
from ray.util.state import list_actors
answer = [(a.class_name, a.node_id) for a in list_actors(address="{c['dashboard']}", limit=10_000, detail=True,
                                                          raise_on_missing_output=False)]
""")
    placed = {}
    for class_name, node_id in actors:
        placed.setdefault(class_name, set()).add(node_id)
    model_actors = ("Sampler", "LogProbScorer", "SampleAndScore", "SampleEachAndScore")
    samplers = {n for name, ids in placed.items() if any(op in name for op in model_actors) for n in ids}
    trainers = {n for name, ids in placed.items() if name == "RayTrainWorker" for n in ids}
    assert samplers == {sampler_node}, placed
    assert trainers == {trainer_node}, placed

    # Every output and checkpoint on the shared storage.
    run_dir = run_root / "tiny"
    from dpo_ray.artifacts import read_manifest

    for stage in STAGES:
        assert read_manifest(run_dir / stage), f"{stage} not under the shared run.root"
    assert list((run_dir / "ray_train").glob("train-*/checkpoint_*/policy/model.safetensors"))

    # The tracking server holds the parent run, one run per stage, the per-step metrics and the trained policy;
    # its artifacts went to the shared folder, its database stayed on the head's disk.
    client, runs = mlflow_runs(c["tracking"])
    parent = the_parent_run(runs)
    assert parent.data.tags["dpo_ray.run_dir"] == str(run_dir)
    stage_runs = {r.data.tags["dpo_ray.stage"]: r for r in runs_under(parent, runs)}
    assert set(stage_runs) == set(STAGES)
    train_run = stage_runs["train"]
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) >= 2
    models = client.search_logged_models([train_run.info.experiment_id])
    assert [m.name for m in models if m.source_run_id == train_run.info.run_id] == ["policy"]
    assert list((shared / "mlflow" / "artifacts").rglob("model.safetensors"))
    assert (c["head_home"] / "mlflow" / "mlflow.db").is_file()

    # Nothing written into Ray's temporary copies of the working dir, nor a stray local MLflow store.
    for temp in c["temps"]:
        leftovers = [p for p in temp.rglob("*") if p.name in ("runs", "mlruns", "mlflow.db", "mlartifacts")]
        assert not leftovers, leftovers
