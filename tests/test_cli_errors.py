"""The `dpo-ray` command as a user runs it: a config error is one line and exit code 2, the traceback only
with --debug or DPO_RAY_DEBUG=1."""

import os
import subprocess
import sys
from pathlib import Path

DPO_RAY = str(Path(sys.executable).with_name("dpo-ray"))


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([DPO_RAY, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_a_config_error_is_one_line_and_exit_code_2():
    proc = _run("run", "train.beta=-1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo-ray: config error: train.beta"), proc.stderr


def test_debug_shows_the_traceback():
    for proc in (_run("run", "train.beta=-1", "--debug"), _run("run", "train.beta=-1", DPO_RAY_DEBUG="1")):
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr and "ConfigError: train.beta" in proc.stderr


def test_sqlite_write_failures_under_mlflow_are_storage_errors():
    # SQLITE_FULL (a full disk) and SQLITE_IOERR (a refused write) as MLflow's store raises them; other
    # database errors stay bugs with their traceback.
    import sqlite3

    from mlflow.exceptions import MlflowException

    from dpo_ray.errors import tracking_store_failure

    for message in ("database or disk is full", "disk I/O error"):
        try:
            try:
                raise sqlite3.OperationalError(message)
            except sqlite3.OperationalError as err:
                raise MlflowException(f"(sqlite3.OperationalError) {message}") from err
        except MlflowException as err:
            assert tracking_store_failure(err) == message
    assert tracking_store_failure(MlflowException("(sqlite3.OperationalError) no such table: runs")) is None
    assert tracking_store_failure(ValueError("disk I/O error")) is None  # not from SQLite
