"""Faults a long cluster run meets: a training worker killed mid-run, a driver killed mid-stage, a bad run root."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import isolated_env, make_reference_parquet
from safetensors.torch import load_file

from dpo_ray.artifacts import read_manifest
from dpo_ray.pipeline import check_writable

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return isolated_env()


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 600) -> str:
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}:\n{seen[-3000:]}")


def test_unwritable_run_root_fails_before_any_work():
    with pytest.raises(OSError, match=r"^run.root: cannot write to /proc/"):
        check_writable(Path("/proc/dpo-ray-test/run"))


@pytest.mark.slow
@pytest.mark.unverified
def test_killed_training_worker_is_restarted_from_checkpoint_and_matches_uninterrupted(tmp_path):
    reference = make_reference_parquet(tmp_path / "reference")
    common = ["--config", "configs/tiny.yaml", "--reference", str(reference), "train.epochs=30",
              "train.checkpoint_every=5", "train.batch_size=4", "train.micro_batch_size=2", "train.max_failures=1"]
    clean = subprocess.run([sys.executable, "-m", "dpo_ray.cli", "train", *common, "--out", str(tmp_path / "clean"),
                            f"run.root={tmp_path / 'a'}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, "-m", "dpo_ray.cli", "train", *common, "--out", str(tmp_path / "killed"),
                             f"run.root={tmp_path / 'b'}"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(proc, "step 12/120")
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert workers, "no Ray Train worker process found"
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest[-3000:]
    assert "resumed from step 10" in rest
    assert read_manifest(tmp_path / "killed")["stats"]["steps"] == 120
    a = load_file(tmp_path / "clean" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "policy" / "model.safetensors")
    # Same data order and optimizer state from step 10 on: the weights agree to float tolerance.
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, name


@pytest.mark.slow
@pytest.mark.unverified
def test_driver_killed_mid_stage_leaves_nothing_that_reads_as_complete(tmp_path):
    args = [sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", f"run.root={tmp_path}",
            "data.num_train_prompts=16"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for(proc, "[dpo-ray] label: running")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_dir = tmp_path / "tiny"
    assert read_manifest(run_dir / "sample") is not None
    assert read_manifest(run_dir / "label") is None and not (run_dir / "label").exists()
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[dpo-ray] sample: up to date, skipped" in done.stdout
    label_stats = read_manifest(run_dir / "label")["stats"]
    assert label_stats["completions"] == read_manifest(run_dir / "sample")["stats"]["completions"] == 16 * 4
    assert not list(run_dir.glob(".*.partial"))
