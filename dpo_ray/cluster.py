"""Ray at the edge: joining (or starting) the cluster a driver runs on, and what a Ray job's driver must check.

Stages never call Ray's cluster APIs themselves; the DAG and the stage commands call `init_ray` once at start.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Mapping

import ray
import ray.data

from dpo_ray.config import PipelineConfig, check_resources
from dpo_ray.errors import ConfigError

_FORWARDED_ENV = ("DPO_RAY_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MLFLOW_TRACKING_URI")
# Where a Ray job's driver finds the job's config, runtime env included (ray._private.runtime_env.constants).
_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def init_ray(cfg: PipelineConfig) -> None:
    """Join $RAY_ADDRESS / run.ray_address or a cluster started with `ray start`, else start a local one; then
    check that every stage's resource request fits the cluster (ConfigError naming the key if not)."""
    # Ray Data otherwise emits blocks as tasks finish, so a stage's output rows come in another order each run.
    # The train stage needs it to keep its seeded order through the split into workers (train.run).
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # Ray 2.60's default Parquet reader (datasource V2) starts a pool of up to 32 footer-reader actors for every
    # read_parquet, each a fresh Python process; on a small node they compete with the model actor's start-up for
    # the cores (benchmarks/README.md, figure 2). The V1 reader reads footers in its read tasks.
    context.use_datasource_v2 = False
    # Ray 2.60's default shuffle (SHUFFLE_V2, hash-based) starts aggregator actors, fresh Python processes, for every
    # groupby: 5.8 s against 1.5 s for the sort-based pull shuffle on a 128-row label stage on two cores, for each
    # label stage of every round. The pull-based sort shuffle runs in tasks on the workers Ray already has and is
    # the one Ray's own large-sort benchmarks use.
    context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if not ray.is_initialized():
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        handler = signal.getsignal(signal.SIGTERM)
        # A local cluster's workers inherit this process's environment. A runtime env, even env vars alone, makes
        # Ray start a fresh worker process for every task and actor instead of the ones it prestarted: 20 tasks
        # 2.9-3.2 s against 0.8-1.1 s, an actor 1.4-2.1 s against 0.7-1.0 s (benchmarks/README.md).
        runtime_env = {"env_vars": forwarded_env(os.environ)} if joins_a_cluster(cfg.run.ray_address) else None
        ray.init(address=cfg.run.ray_address, runtime_env=runtime_env)
        # ray.init replaces the SIGTERM handler (its core worker's ends in abort(), without unwinding); put back
        # the one the CLI set (cli._sigterm_unwinds), which ends open MLflow runs FAILED.
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
    if cfg.run.check_resources:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        largest = {k: max(n.get(k, 0.0) for n in nodes) for k in set().union(*nodes)}
        check_resources(cfg, ray.cluster_resources(), largest)


def joins_a_cluster(address: str | None) -> bool:
    """Whether ray.init(address) joins a running cluster (whose workers do not share this process's environment)
    rather than starting a local one; decided as ray.init decides it, from the address, $RAY_ADDRESS and the
    cluster a `ray start` on this machine left."""
    from ray._private.services import canonicalize_bootstrap_address

    if (address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://"):
        return True
    try:
        return canonicalize_bootstrap_address(address) is not None
    except Exception:  # ray.init will say what is wrong with the address; forwarding the env is the safe side
        return True


def _job_runtime_env(environ: Mapping[str, str]) -> dict:
    """The runtime env of the Ray job this driver runs as ({} outside a job)."""
    job_config = environ.get(_JOB_CONFIG_VAR)
    return (json.loads(job_config).get("runtime_env") or {}) if job_config else {}


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's settings every worker needs, minus those a Ray job's own runtime env already sets: Ray refuses
    to merge a job's runtime env with ray.init's when both name the same variable, even with equal values."""
    set_by_job = _job_runtime_env(environ).get("env_vars") or {}
    return {k: environ[k] for k in _FORWARDED_ENV if k in environ and k not in set_by_job}


def check_run_root(cfg: PipelineConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a relative run.root in a Ray job with a working dir: the job runs in Ray's temporary copy of that
    dir, which is deleted with the Ray session, outputs and MLflow store included."""
    if Path(cfg.run.root).is_absolute() or not _job_runtime_env(environ).get("working_dir"):
        return
    raise ConfigError(f"run.root: {cfg.run.root!r} is relative, and this Ray job runs in Ray's temporary copy of its "
                      f"working dir ({Path.cwd()}), which is deleted with the Ray session; give an absolute path "
                      "(e.g. run.root=$PWD/runs on the `ray job submit` line, or shared storage on a cluster)")
