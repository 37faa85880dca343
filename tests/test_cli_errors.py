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
