"""The stage runner: one stage into its folder, skipped when its manifest says the same inputs made it.

Every stage module has the same shape:

    SOURCES = {"completions": True}       # upstream inputs by name (a CLI option each; True: the CLI requires it;
                                          # MANY: optional and repeatable, a list of paths)
    def inputs(cfg, digests) -> dict      # what determines the output; the manifest key is its hash
    def run(ctx: StageContext) -> dict    # writes ctx.out, returns the stage's statistics

`dpo-ray run` and `dpo-ray <stage>` both call `StageRunner` with the stage's sources as paths, so both key a stage
the same way (keys.digest). A stage writes a temp folder that is published with a manifest written last
(artifacts.publish), so an interrupted stage leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Mapping

from dpo_ray import artifacts, keys
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import StorageError, tracking_store_error
from dpo_ray.tracking import Tracker

log = logging.getLogger(__name__)


# A SOURCES kind: the source is a list of paths (a CLI option given any number of times).
MANY = "many"


@dataclass(frozen=True)
class StageContext:
    """What a stage's `run` gets: the config, the folder to write, its upstream inputs, its key and MLflow run."""

    cfg: PipelineConfig
    out: Path
    sources: Mapping[str, Path | list[Path]] = field(default_factory=dict)
    key: str = ""
    run_id: str | None = None
    # The model that sampled the completions in `sources`, when the caller knows it (label reuses exact log-probs).
    sampled_by: str | None = None


def check_writable(folder: Path, min_free_gb: float = 1.0) -> None:
    """Fail before any work if the run folder cannot be written or its disk is nearly full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise StorageError(f"run.root: cannot write to {folder} ({err.strerror or err})") from None
    free_gb = shutil.disk_usage(folder).free / 2**30
    if free_gb < min_free_gb:
        raise StorageError(f"run.root: only {free_gb:.2f} GiB free under {folder}; need at least {min_free_gb} GiB")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_CLEANED_UP = ("nothing was published and the partial output was removed; free space and rerun (finished stages "
               "are skipped)")


@contextlib.contextmanager
def _disk_full_is_clear(stage: str, final: Path, tmp: Path):
    """Turn a full disk anywhere in a stage into one clear error, and free what the stage had written."""
    try:
        yield
    except Exception as err:
        store = tracking_store_error(err, stage)
        # Ray re-raises a worker's OSError as a RayTaskError subclass that may lose errno but keeps the text.
        disk_full = getattr(err, "errno", None) in _DISK_FULL or "No space left on device" in str(err)
        if store is None and not disk_full:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if store is not None:
            raise StorageError(errno.ENOSPC, f"{store.strerror}; {_CLEANED_UP}") from err
        free_gb = shutil.disk_usage(final.parent).free / 2**30
        raise StorageError(errno.ENOSPC, f"{stage}: disk full while writing {final} ({free_gb:.2f} GiB free now); "
                           f"{_CLEANED_UP}") from err


def stage_name(stage: ModuleType) -> str:
    return stage.__name__.rsplit(".", 1)[-1]


class StageRunner:
    """Runs a stage module into its folder unless a matching manifest says it is already done."""

    def __init__(self, tracker: Tracker | None):
        self.tracker = tracker

    def __call__(self, stage: ModuleType, cfg: PipelineConfig, final: Path,
                 sources: Mapping[str, Path | list[Path]] = {},
                 sampled_by: str | None = None) -> dict:
        name = stage_name(stage)
        inputs = stage.inputs(cfg, {k: keys.digest(path, f"--{k}") for k, path in sources.items()})
        key = artifacts.input_key(inputs)
        done = artifacts.read_manifest(final)
        if done and done.get("key") == key:
            log.info(f"{name}: up to date, skipped ({final})")
            if self.tracker:
                self.tracker.log_skip(name)
            return done
        tmp = artifacts.partial_dir(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info(f"{name}: running -> {final}")
        started = time.time()
        with _disk_full_is_clear(name, final, tmp):
            if self.tracker:
                with self.tracker.stage(name, inputs, final) as run_id:
                    stats = stage.run(StageContext(cfg, tmp, dict(sources), key, run_id, sampled_by))
                    manifest = _manifest(name, key, inputs, stats, started)
                    self.tracker.log_stage({**stats, "seconds": manifest["seconds"]}, tmp)
                    manifest = artifacts.publish(tmp, final, manifest)
                    self.tracker.mlflow.log_artifact(str(final / artifacts.MANIFEST))
            else:
                stats = stage.run(StageContext(cfg, tmp, dict(sources), key, None, sampled_by))
                manifest = artifacts.publish(tmp, final, _manifest(name, key, inputs, stats, started))
        log.info(f"{name}: done in {manifest['seconds']:.0f}s {stats}")
        return manifest


def _manifest(name, key, inputs, stats, started) -> dict:
    return {"stage": name, "key": key, "inputs": inputs, "stats": stats, "seconds": time.time() - started}
