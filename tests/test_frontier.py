"""pipelines/frontier.py on the tiny model: two variants share one reference pass and one set of pairs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import check_run_tree, isolated_env, mlflow_runs, runs_under, sqlite_store

from dpo_ray.artifacts import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_frontier_trains_each_variant_on_the_same_reference(tmp_path):
    env = isolated_env()
    cmd = [sys.executable, "pipelines/frontier.py", "--config", "configs/tiny.yaml", f"run.root={tmp_path}",
           "run.name=frontier", "data.num_train_prompts=16", "frontier.betas=[0.1]", "frontier.losses=[sigmoid,ipo]"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "frontier"
    assert proc.stdout.count("[dpo-ray] reference: running") == 1
    reference_digest = read_manifest(run_dir / "reference")["output_digest"]
    points = json.loads((run_dir / "frontier.json").read_text())["points"]
    assert [(p["loss"], p["beta"]) for p in points] == [("sigmoid", 0.1), ("ipo", 0.1)]
    for p in points:
        train = read_manifest(run_dir / "frontier" / p["variant"] / "train")
        assert train["inputs"]["reference"] == reference_digest
        assert train["inputs"]["train"]["loss"] == p["loss"]
        assert read_manifest(run_dir / "frontier" / p["variant"] / "evaluate") is not None
    assert (run_dir / "frontier.png").stat().st_size > 1000
    assert "| ipo_beta0.1 | ipo |" in (run_dir / "frontier.md").read_text()

    # Two CPUs, one single-CPU worker per variant: both Ray Train runs were in flight at the same time.
    assert "training 2 variants, 2 at a time" in proc.stdout
    # Status lines only: a stage may also print notes of its own under its name.
    train_states = [line.split(":")[1].split()[0] for line in proc.stdout.splitlines()
                    if line.startswith("[dpo-ray] train: ")]
    assert [state for state in train_states if state in ("running", "done")] == ["running", "running", "done", "done"]

    _, runs = mlflow_runs(sqlite_store(tmp_path))
    variants = check_run_tree(runs, {"sigmoid_beta0.1", "ipo_beta0.1"}, ["evaluate", "train"])
    for variant in variants.values():
        assert "policy_reward" in variant.data.metrics
        train_run = next(r for r in runs_under(variant, runs) if r.data.tags["dpo_ray.stage"] == "train")
        assert "loss" in train_run.data.metrics  # per-step metrics from rank 0 reached the right run
