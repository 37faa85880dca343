"""What README.md and cluster/README.md tell a user to type, run as written.

Every ```bash block is either run here (or by the test named in RUN_ELSEWHERE) or marked in the doc as needing
a real cluster, with the reason. The only additions are a config that makes a run small, appended to the
pipeline's command line, and the user's own paths where the doc shows placeholders.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import doc_shell_blocks, isolated_env

from dpo_ray.artifacts import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "cluster" / "README.md"]
SMALL = "--config configs/tiny.yaml data.num_train_prompts=8"
# Blocks whose commands other tests run verbatim: the README's two commands (`make test` is what CI runs;
# `make run` feeds tests/test_pipeline_e2e.py through ARGS) and cluster/README's secrets (the cluster rehearsal).
RUN_ELSEWHERE = {"make run": "tests/test_pipeline_e2e.py::tiny_run",
                 "ray get-auth-token": "tests/test_cluster_job.py::rehearsal",
                 ".venv/bin/dpo-ray plan": "tests/test_memory_plan.py::test_readme_plan_command"}


def _block(first_line_start: str) -> str:
    found = [b["text"] for doc in DOCS for b in doc_shell_blocks(doc)
             if any(line.startswith(first_line_start) for line in b["text"].splitlines())]
    assert len(found) == 1, f"expected one block with a line starting {first_line_start!r}, found {len(found)}"
    return found[0]


def _small(block: str, run_name: str, *extra: str) -> str:
    """The block with the small config appended to the pipeline's command, nothing else changed (backslash line
    continuations are joined first, which the shell does too)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    extend = lambda m: " ".join([m.group(1), SMALL, f"run.name={run_name}", *extra])  # noqa: E731
    return re.sub(r"^(.*pipelines/full\.py.*)$", extend, joined, count=1, flags=re.M)


def _bash(script: str, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    env = isolated_env()
    env.pop("RAY_ADDRESS")  # the user's shell has none; `ray start` and the job find the cluster themselves
    return subprocess.run(["bash", "-e", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture()
def no_ray_in_this_process():
    # The blocks end with `ray stop`, which stops every Ray instance on the machine, this process's included.
    import ray

    ray.shutdown()
    yield
    # A block that failed before its own `ray stop` leaves its cluster running.
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop"], capture_output=True, timeout=120)


@pytest.fixture()
def default_agent_port_taken():
    """Ray's default dashboard agent port held by someone else, as another Ray instance or an outgoing connection
    (52365 is in Linux's ephemeral range) may hold it: the README's block must not depend on it being free. A
    fresh-clone `make test` once failed this way ("No available agent to submit job")."""
    holder = socket.socket()
    try:
        holder.bind(("0.0.0.0", 52365))
        holder.listen()
    except OSError:
        pass  # already taken, which is the case under test
    yield
    holder.close()


@pytest.fixture()
def run_name():
    name = f"docs-{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(REPO / "runs" / name, ignore_errors=True)


def test_every_block_is_run_or_says_why_not():
    covered = {"ray start --head", "MODEL=", "mlflow ui", *RUN_ELSEWHERE, "make test"}
    for doc in DOCS:
        for block in doc_shell_blocks(doc):
            where = f"{block['doc']}:{block['line']}"
            if block["not_run"] is not None:
                assert block["not_run"], f"{where}: the not-run marker needs a reason"
                continue
            assert any(start in block["text"] for start in covered), f"{where}: no test runs this block"


def test_readme_ray_job_then_mlflow_ui(no_ray_in_this_process, default_agent_port_taken, run_name):
    proc = _bash(_small(_block("ray start --head"), run_name), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    run_dir = REPO / "runs" / run_name
    for stage in ("sample", "label", "reference", "train", "evaluate"):
        assert read_manifest(run_dir / stage), f"{stage} not published under the checkout's runs/"
    assert f"run dir:        {run_dir}" in proc.stdout
    # Each training step's line reaches the user's console once (Ray Train's print patch used to double it).
    steps = [line.split("[train] ", 1)[1] for line in proc.stdout.splitlines() if "[train] step" in line]
    assert steps and len(steps) == len(set(steps)), steps

    # The README's next block, on the MLflow store the job wrote to.
    ui = subprocess.Popen(["bash", "-c", "exec " + _block(".venv/bin/mlflow ui").strip()], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline and run_name not in body:
            try:
                body = _mlflow_runs_listing("http://127.0.0.1:5000")
            except OSError:
                time.sleep(2)
        assert run_name in body, "the MLflow UI does not list the job's run"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def _mlflow_runs_listing(server: str) -> str:
    def call(path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=5).read())

    experiment = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=dpo-ray")["experiment"]
    return json.dumps(call("/api/2.0/mlflow/runs/search",
                           {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}))


def test_a_job_with_a_relative_run_root_fails_with_one_line(no_ray_in_this_process):
    documented = _block("ray start --head")
    relative = documented.replace(" run.root=$PWD/runs", "")
    assert relative != documented
    proc = _bash(_small(relative, "docs-relative"), timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dpo-ray: config error: run.root: 'runs' is relative, and this Ray job runs in Ray's temporary" in output
    assert "Traceback" not in output
    assert not (REPO / "runs" / "docs-relative").exists()


def test_readme_own_model_prompts_and_reward_model(tmp_path, run_name):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from dpo_ray.models import resolve_model

    # The user's folders: a policy, and a one-output reward model with the same tokenizer.
    shutil.copytree(resolve_model("builtin:tiny-llama"), tmp_path / "policy")
    config = AutoConfig.from_pretrained(tmp_path / "policy", num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    paths = {"MODEL": tmp_path / "policy", "PROMPTS": REPO / "data" / "prompts" / "movie_reviews.jsonl",
             "REWARD_MODEL": tmp_path / "rm"}
    block = _block("MODEL=")
    for name, path in paths.items():
        block, count = re.subn(rf"^{name}=\S+", f"{name}={path}", block, flags=re.M)
        assert count == 1, name
    proc = _bash(_small(block, run_name, f"run.root={tmp_path / 'runs'}"), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / run_name
    label = read_manifest(run_dir / "label")
    assert label["stats"]["pairs"] > 0
    assert read_manifest(run_dir / "evaluate")
