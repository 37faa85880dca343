"""Faults a long cluster run meets: a training worker or sampling actor killed mid-run, a driver killed at several
points, a full disk, a bad run root."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import isolated_env, mlflow_runs, sqlite_store, the_parent_run
from safetensors.torch import load_file

from dpo_ray.artifacts import read_manifest
from dpo_ray.config import load_config
from dpo_ray.runner import StageRunner, check_writable

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
def _stage(name: str, run) -> SimpleNamespace:
    """A stage module's shape (runner.py) around `run`, with fixed inputs."""
    return SimpleNamespace(__name__=f"dpo_ray.stages.{name}", inputs=lambda _cfg, _digests: {"k": 1}, run=run)


def test_disk_full_mid_stage_is_one_clear_error_and_leaves_nothing_that_reads_as_output(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    final = tmp_path / "tiny" / "label"

    def fills_the_disk(ctx) -> dict:
        tmp = ctx.out
        pq.write_table(pa.table({"x": list(range(1000))}), tmp / "complete-looking.parquet")
        # The kernel's own ENOSPC: every write to /dev/full fails with "No space left on device".
        (tmp / "pairs.parquet").symlink_to("/dev/full")
        pq.write_table(pa.table({"x": list(range(100_000))}), tmp / "pairs.parquet")
        return {"pairs": 100_000}

    with pytest.raises(OSError, match=r"^\[Errno 28\] label: disk full while writing .*/label \(.* GiB free now\); "
                                      r"nothing was published and the partial output was removed"):
        StageRunner(None)(_stage("label", fills_the_disk), cfg, final)
    assert not final.exists()
    assert not list(final.parent.glob(".*partial*"))
    # Once there is space the same call runs and publishes.
    manifest = StageRunner(None)(_stage("label", lambda _ctx: {"pairs": 0}), cfg, final)
    assert read_manifest(final)["key"] == manifest["key"]


@pytest.mark.slow
def test_an_error_met_after_joining_ray_is_the_last_line_printed(tmp_path, capsys):
    """Ray forwards its raylets' and workers' log lines to a driver until the driver leaves it: CI's raylet warned
    that its disk was over 95% full after the error line. The CLI leaves Ray before it prints the error."""
    import ray

    from dpo_ray import cli

    ray.shutdown()  # an earlier test of this process may have left it joined; a command leaves only what it joined
    with pytest.raises(SystemExit) as stopped:
        cli.main(["sample", "--config", str(REPO / "configs/tiny.yaml"), "--out", str(tmp_path / "samples"),
                  f"run.root={tmp_path / 'runs'}", "sample.num_actors=64"])
    assert stopped.value.code == 2
    # The resource check runs after ray.init, so this error was met while joined to a Ray cluster.
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "dpo-ray: config error: sample.cpus_per_actor: 64 x 1 CPU = 64 CPU, but the Ray cluster has")
    assert not ray.is_initialized()


@pytest.mark.slow
def test_an_unwritable_mlflow_store_is_one_line_and_the_rerun_ends_the_run_it_left(tmp_path):
    """The default layout (MLflow's sqlite file under run.root) when the database cannot be written: the driver
    alone runs under a file size limit of half the database's size, so SQLite's writes to its newest pages fail in
    the kernel (EFBIG), as writes fail on a full disk, while the Ray cluster (started apart, unlimited) keeps its
    logs and object store."""
    import resource

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ray_bin = Path(sys.executable).with_name("ray")
    # Token auth off: Ray 2.60's `ray start --head` would otherwise want its token from the driver (this cluster
    # listens on this machine only and lives for one test).
    # Its raylet warns every 10 s that the disk is over the capacity threshold, as CI's did on a 95% full disk;
    # none of those lines may come after the error line.
    env = {**_env(), "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled",
           "RAY_local_fs_capacity_threshold": "0.01"}
    root = tmp_path / "runs"
    try:
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}",
                        "--include-dashboard=false"], env=env, check=True,
                       capture_output=True, timeout=180)

        def sample(out: str, limit: int | None = None) -> subprocess.CompletedProcess:
            def limited() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

            return subprocess.run([sys.executable, "-m", "dpo_ray.cli", "sample", "--config", "configs/tiny.yaml",
                                   "--out", str(tmp_path / out), f"run.root={root}", "data.num_train_prompts=8"],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                                  preexec_fn=limited if limit else None)

        first = sample("first")
        assert first.returncode == 0, first.stderr[-3000:]
        database = root / "mlflow.db"
        full = sample("second", limit=database.stat().st_size // 2)
        assert full.returncode == 5, full.stdout[-2000:] + full.stderr[-3000:]
        assert full.stderr.strip().splitlines()[-1].startswith(
            f"dpo-ray: storage error: sample: the MLflow store sqlite:///{database} could not be written (SQLite: ")
        assert "Traceback" not in full.stderr and "nothing was published" in full.stderr
        assert not (tmp_path / "second").exists() and not list(tmp_path.glob(".second*"))

        # The failed stage's run could not be ended either (the store could not be written): RUNNING for now.
        _, runs = mlflow_runs(sqlite_store(root))
        assert sorted(r.info.status for r in runs) == ["FINISHED", "RUNNING"]
        again = sample("second")  # space again: the same command runs
        assert again.returncode == 0 and read_manifest(tmp_path / "second"), again.stderr[-3000:]
        # ... and ends the run its failed attempt left RUNNING.
        _, runs = mlflow_runs(sqlite_store(root))
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"], runs
        assert "1 run(s) left RUNNING by an earlier process marked KILLED" in again.stdout
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if str(temp) in " ".join(proc.info["cmdline"] or []) or f"127.0.0.1:{port}" in " ".join(
                    proc.info["cmdline"] or []):
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _kill_first(proc: subprocess.Popen, name: str, delay: float, timeout: float = 300) -> str:
    """SIGKILL the first descendant of `proc` whose command line mentions `name`, `delay` seconds after it is
    seen; returns what was killed (its pid and CPU seconds: start-up or mid-work) for the test's report."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = _descendants(proc, name)
        if found:
            time.sleep(delay)
            victim = found[0]
            cpu = _cpu_seconds(victim)
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                return f"{name} pid {victim.pid} had exited before the kill"
            return f"{name} pid {victim.pid} killed after {cpu:.1f} CPU-s"
        time.sleep(0.1)
    raise AssertionError(f"no {name} process appeared")


class _Output:
    """The command's output read on a thread, so waiting for a line never blocks an actor kill (or vice versa)."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.text, self._proc = "", proc
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.text += line

    def wait_for(self, pattern: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while not re.search(pattern, self.text):
            if time.time() > deadline or (self._proc.poll() is not None and not self._reader.is_alive()):
                raise AssertionError(f"never saw {pattern!r}:\n{self.text[-3000:]}")
            time.sleep(0.05)


@pytest.mark.slow
def test_chaos_seeded_kills_of_driver_and_workers_end_as_an_uninterrupted_run(tmp_path):
    """A seeded schedule SIGKILLs a sampling actor, the driver (with its local Ray cluster), a scorer actor, a Ray
    Train worker, the driver mid-training and the driver mid-evaluate, each at a random moment, rerunning the same
    documented command after each driver kill. The outputs equal an uninterrupted run's, nothing half-written is
    ever read, there is one MLflow parent and no run stays RUNNING. Replay a failure with DPO_RAY_CHAOS_SEED."""
    import random

    seed = int(os.environ.get("DPO_RAY_CHAOS_SEED", "20261204"))
    rng = random.Random(seed)
    # 14 pairs, 4 steps an epoch, 40 steps with a checkpoint every 2; train.max_failures lets Ray Train restart
    # its worker group after the worker kill.
    overrides = ["data.num_train_prompts=16", "train.epochs=10", "train.max_failures=2"]

    def command(root: Path) -> list[str]:
        return [sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", f"run.root={root}", *overrides]

    clean = subprocess.run(command(tmp_path / "clean"), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    root = tmp_path / "chaos"
    run_dir = root / "tiny"
    first_driver_kill = rng.choice(["label", "reference"])
    worker_step, driver_step = rng.randint(5, 12), rng.randint(16, 24)
    delays = [round(rng.uniform(0, 1.5), 2) for _ in range(6)]
    schedule = [f"sampler at {delays[0]}s", f"driver at {first_driver_kill} +{delays[1]}s",
                f"scorer at {delays[2]}s", f"train worker at step {worker_step} +{delays[3]}s",
                f"driver at step {driver_step} +{delays[4]}s", f"driver at evaluate +{2 * delays[5]}s"]
    report = [f"chaos seed {seed}: {schedule}"]
    print(report[0])  # shown by pytest on failure, with what each kill hit

    def finished() -> list[str]:
        return [s for s in ("sample", "label", "reference", "train", "evaluate") if read_manifest(run_dir / s)]

    def nothing_half_published() -> None:
        # A stage folder exists only complete, with its manifest; temp folders are hidden.
        for stage in ("sample", "label", "reference", "train", "evaluate"):
            assert not (run_dir / stage).exists() or read_manifest(run_dir / stage), stage

    with _started(command(root)) as proc:
        out = _Output(proc)
        out.wait_for(r"\[dpo-ray\] sample: running")
        report.append(_kill_first(proc, "TransformersSampler", delays[0]))
        out.wait_for(rf"\[dpo-ray\] {first_driver_kill}: running")
        time.sleep(delays[1])
    nothing_half_published()
    assert finished()[:1] == ["sample"], report

    with _started(command(root)) as proc:
        out = _Output(proc)
        out.wait_for(r"\[dpo-ray\] reference: running")
        report.append(_kill_first(proc, "LogProbScorer", delays[2]))
        out.wait_for(rf"\[train\] step {worker_step}/")
        time.sleep(delays[3])
        report.append(_kill_first(proc, "RayTrainWorker", 0))
        out.wait_for(rf"\[train\] step {driver_step}/")
        time.sleep(delays[4])
        assert "sample: up to date, skipped" in out.text, report
    nothing_half_published()
    assert finished() == ["sample", "label", "reference"], report

    with _started(command(root)) as proc:
        out = _Output(proc)
        out.wait_for(r"\[dpo-ray\] evaluate: running")
        time.sleep(2 * delays[5])
        assert "reference: up to date, skipped" in out.text and "[train] resumed from step" in out.text, report
    nothing_half_published()

    done = subprocess.run(command(root), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, "\n".join(report) + done.stdout[-3000:] + done.stderr[-3000:]
    assert "[dpo-ray] evaluate: done" in done.stdout and done.stdout.count("up to date, skipped") == 4, report
    assert finished() == ["sample", "label", "reference", "train", "evaluate"]
    assert not list(run_dir.glob(".*partial*"))

    from dpo_ray import schemas

    def rows(run_root: Path, folder: str, schema, key: list[str]) -> list[tuple]:
        table = schemas.read_table(run_root / "tiny" / folder, schema)
        return sorted(zip(*(table[k].to_pylist() for k in key)))

    for folder, schema, key in [
        ("sample/completions", schemas.COMPLETIONS, ["prompt_id", "sample_index", "completion_ids"]),
        ("label/pairs", schemas.PAIRS, ["pair_id", "chosen_ids", "rejected_ids"]),
        ("evaluate/eval_samples", schemas.EVAL_SAMPLES, ["prompt_id", "model", "sample_index"]),
    ]:
        chaos = rows(root, folder, schema, key)
        assert chaos and chaos == rows(tmp_path / "clean", folder, schema, key), (folder, report)
    key = ["pair_id", "ref_chosen_logps", "ref_rejected_logps"]
    chaos, clean_ = rows(root, "reference", schemas.REFERENCE, key), rows(tmp_path / "clean", "reference",
                                                                           schemas.REFERENCE, key)
    assert [r[0] for r in chaos] == [r[0] for r in clean_], report
    for a, b in zip(chaos, clean_):
        assert a[1:] == pytest.approx(b[1:], abs=1e-4), (a[0], report)
    # Resumed twice: after the worker kill (Ray Train's restart) and after the driver kill mid-training.
    stats = read_manifest(run_dir / "train")["stats"]
    assert len(stats["resumed_from"]) == 2 and stats["steps"] == 40, (stats, report)
    a = load_file(tmp_path / "clean" / "tiny" / "train" / "policy" / "model.safetensors")
    b = load_file(run_dir / "train" / "policy" / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, (name, report)

    _, runs = mlflow_runs(sqlite_store(root), max_results=500)
    parent = the_parent_run(runs, report)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs if r is not parent)
    # A SIGKILLed driver cannot end its runs; the next run of the same run dir marks them KILLED.
    status = [r.info.status for r in runs]
    assert "RUNNING" not in status and 1 <= status.count("KILLED") <= 3, (status, report)
    assert all(r.data.tags.get("dpo_ray.ended_by") for r in runs if r.info.status == "KILLED")
    print("\n".join(report))


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

    _, runs = mlflow_runs(sqlite_store(tmp_path), max_results=200)
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
