"""Faults a long cluster run meets: a training worker killed mid-run, a driver killed mid-stage, a bad run root."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import isolated_env, make_reference_parquet
from safetensors.torch import load_file

from dpo_ray.artifacts import read_manifest
from dpo_ray.config import load_config
from dpo_ray.pipeline import StageRunner, check_writable

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


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_mid_stage_is_one_clear_error_and_leaves_nothing_that_reads_as_output(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    final = tmp_path / "tiny" / "label"

    def fills_the_disk(tmp: Path, _run, _key) -> dict:
        pq.write_table(pa.table({"x": list(range(1000))}), tmp / "complete-looking.parquet")
        # The kernel's own ENOSPC: every write to /dev/full fails with "No space left on device".
        (tmp / "pairs.parquet").symlink_to("/dev/full")
        pq.write_table(pa.table({"x": list(range(100_000))}), tmp / "pairs.parquet")
        return {"pairs": 100_000}

    with pytest.raises(OSError, match=r"^\[Errno 28\] label: disk full while writing .*/label \(.* GiB free now\); "
                                      r"nothing was published and the partial output was removed"):
        StageRunner(cfg, None)("label", final, {"k": 1}, fills_the_disk)
    assert not final.exists()
    assert not list(final.parent.glob(".*partial*"))
    # Once there is space the same call runs and publishes.
    manifest = StageRunner(cfg, None)("label", final, {"k": 1}, lambda tmp, _r, _k: {"pairs": 0})
    assert read_manifest(final)["key"] == manifest["key"]


@pytest.mark.slow
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
    # The newest checkpoint the controller had registered when the worker died: step 10, or step 5 when the
    # step-10 report was still in flight (Ray Train registers checkpoints asynchronously).
    resumed = re.search(r"resumed from step (\d+)", rest)
    assert resumed and int(resumed.group(1)) in (5, 10), rest[-3000:]
    assert read_manifest(tmp_path / "killed")["stats"]["steps"] == 120
    a = load_file(tmp_path / "clean" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "policy" / "model.safetensors")
    # Same data order and optimizer state from step 10 on: the weights agree to float tolerance.
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, name


@pytest.mark.slow
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


def _sample_cli(out: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "dpo_ray.cli", "sample", "--config", "configs/tiny.yaml", "--out", str(out),
            f"run.root={root}", "data.num_train_prompts=128", "sample.batch_size=2", "sample.max_new_tokens=24"]


@pytest.mark.slow
def test_killed_sampling_actor_is_replaced_and_no_row_is_lost_or_duplicated(tmp_path):
    clean = subprocess.run(_sample_cli(tmp_path / "clean", tmp_path), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    proc = subprocess.Popen(_sample_cli(tmp_path / "killed", tmp_path), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, victim = time.time() + 300, None
        while victim is None and time.time() < deadline and proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    # Kill only once the actor has loaded its model and sampled for a while: mid-dataset.
                    if "TransformersSampler" in " ".join(p.cmdline()) and sum(p.cpu_times()[:2]) > 6:
                        victim = p
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)
        assert victim is not None, "no sampling actor found"
        assert read_manifest(tmp_path / "killed") is None, "the stage finished before the kill; make it longer"
        victim.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest[-3000:]
    assert rest.count("[dpo-ray] sample: done") == 1

    from dpo_ray import schemas

    def rows(out: Path) -> list[tuple]:
        table = schemas.read_table(out / "completions", schemas.COMPLETIONS)
        return sorted(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(),
                          table["completion_ids"].to_pylist()))

    killed, reference = rows(tmp_path / "killed"), rows(tmp_path / "clean")
    assert len(killed) == 128 * 4
    assert len({(p, i) for p, i, _ in killed}) == len(killed)  # no duplicates
    # Seeds are per (prompt, sample), so the retried batches reproduce the uninterrupted run exactly.
    assert killed == reference
