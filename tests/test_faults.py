"""Faults a long cluster run meets: a training worker or sampling actor killed mid-run, a driver killed at several
points, a full disk, a bad run root."""

import contextlib
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


@contextlib.contextmanager
def _started(args: list[str]):
    """A command in its own process group (its local Ray cluster included), output piped; whatever is still
    running when the block ends is SIGKILLed as a group."""
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _descendants(proc: subprocess.Popen, name: str) -> list[psutil.Process]:
    """The command's descendant processes whose command line mentions `name` (a Ray actor's class, say)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if name in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _cpu_seconds(proc: psutil.Process) -> float:
    try:
        return sum(proc.cpu_times()[:2])
    except psutil.NoSuchProcess:
        return 0.0


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

    killed = [sys.executable, "-m", "dpo_ray.cli", "train", *common, "--out", str(tmp_path / "killed"),
              f"run.root={tmp_path / 'b'}"]
    with _started(killed) as proc:
        _wait_for(proc, "step 12/120")
        workers = _descendants(proc, "RayTrainWorker")
        assert workers, "no Ray Train worker process found"
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, rest[-3000:]
    # The newest checkpoint the controller had registered when the worker died: step 10, or step 5 when the
    # step-10 report was still in flight (Ray Train registers checkpoints asynchronously).
    stats = read_manifest(tmp_path / "killed")["stats"]
    assert stats["resumed_from"] in ([5], [10]), rest[-3000:]
    assert stats["steps"] == 120
    a = load_file(tmp_path / "clean" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "policy" / "model.safetensors")
    # Same data order and optimizer state from step 10 on: the weights agree to float tolerance.
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, name


@pytest.mark.slow
def test_driver_killed_at_several_points_resumes_each_time_and_reuses_the_mlflow_run(tmp_path):
    """SIGKILL the driver (and its local Ray cluster) mid-sample, mid-reference, mid-training and mid-evaluate;
    each rerun of the same command skips what was finished, training resumes from its checkpoint, and the
    MLflow parent run is reused."""
    # Four epochs of at least two steps (16 prompts give 8 pairs or more), a checkpoint every two steps.
    args = [sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", f"run.root={tmp_path}",
            "data.num_train_prompts=16", "train.epochs=4"]
    run_dir = tmp_path / "tiny"

    def run_until(text: str) -> str:
        with _started(args) as proc:
            return _wait_for(proc, text)

    def finished() -> list[str]:
        return [s for s in ("sample", "label", "reference", "train", "evaluate") if read_manifest(run_dir / s)]

    run_until("[dpo-ray] sample: running")
    assert finished() == [] and not (run_dir / "sample").exists()
    out = run_until("[dpo-ray] reference: running")
    assert "sample: running" in out and finished() == ["sample", "label"]
    out = run_until("[train] step 5/")
    total = int(re.search(r"\[train\] step 5/(\d+)", out).group(1))
    assert "sample: up to date, skipped" in out and "label: up to date, skipped" in out
    assert finished() == ["sample", "label", "reference"]
    out = run_until("[dpo-ray] evaluate: running")
    assert "reference: up to date, skipped" in out
    # checkpoint_every=2: step 4, or step 2 when the step-4 checkpoint was still being registered.
    assert f"step 1/{total}" not in out
    assert finished() == ["sample", "label", "reference", "train"]
    stats = read_manifest(run_dir / "train")["stats"]
    assert stats["resumed_from"] in ([2], [4]), out[-3000:]
    assert stats["steps"] == total

    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("up to date, skipped") == 4 and "[dpo-ray] evaluate: done" in done.stdout
    assert finished() == ["sample", "label", "reference", "train", "evaluate"]
    assert read_manifest(run_dir / "label")["stats"]["completions"] == 16 * 4
    assert not list(run_dir.glob(".*.partial"))

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dpo-ray").experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs if r not in parents)


@pytest.mark.slow
def test_a_driver_stopped_with_sigterm_ends_its_mlflow_runs_failed(tmp_path):
    # What `ray job stop`, `kill` or a batch scheduler sends; the default action would leave the runs RUNNING.
    args = [sys.executable, "-m", "dpo_ray.cli", "run", "--config", "configs/tiny.yaml", f"run.root={tmp_path}",
            "data.num_train_prompts=8"]
    with _started(args) as proc:
        _wait_for(proc, "[dpo-ray] label: running")
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` does
        rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "dpo-ray: stopped by SIGTERM; open MLflow runs end FAILED" in rest
    assert not (tmp_path / "tiny" / "label").exists() and read_manifest(tmp_path / "tiny" / "sample")

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dpo-ray").experiment_id], max_results=200)
    status = {r.data.tags.get("dpo_ray.stage", "parent"): r.info.status for r in runs}
    assert status == {"parent": "FAILED", "sample": "FINISHED", "label": "FAILED"}, status


def _sample_cli(out: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "dpo_ray.cli", "sample", "--config", "configs/tiny.yaml", "--out", str(out),
            f"run.root={root}", "data.num_train_prompts=128", "sample.batch_size=2", "sample.max_new_tokens=24"]


@pytest.mark.slow
def test_killed_sampling_actor_is_replaced_and_no_row_is_lost_or_duplicated(tmp_path):
    clean = subprocess.run(_sample_cli(tmp_path / "clean", tmp_path), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    with _started(_sample_cli(tmp_path / "killed", tmp_path)) as proc:
        deadline, victim = time.time() + 300, None
        while victim is None and time.time() < deadline and proc.poll() is None:
            # Kill only once the actor has loaded its model and sampled for a while: mid-dataset.
            busy = [p for p in _descendants(proc, "TransformersSampler") if _cpu_seconds(p) > 6]
            victim = busy[0] if busy else None
            time.sleep(0.2)
        assert victim is not None, "no sampling actor found"
        assert read_manifest(tmp_path / "killed") is None, "the stage finished before the kill; make it longer"
        victim.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=900)
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
