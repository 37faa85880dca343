"""The DAG: sample -> label -> reference -> train -> evaluate, driven from plain Python on a Ray cluster.

Each stage writes `<run dir>/<stage>/` through a temp folder and a manifest written last (see artifacts.py);
a stage whose manifest key matches its inputs is skipped, so rerunning a finished or interrupted run only does
what is missing. Training resumes inside the stage from its Ray Train checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import ray
import ray.data

from dpo_ray import artifacts, keys
from dpo_ray.config import (PipelineConfig, build_config, check_resources, concurrent_trainings, merge,
                             round_config)
from dpo_ray.errors import ConfigError, StorageError, tracking_store_error
from dpo_ray.models import resolve_model
from dpo_ray.stages import evaluate, label, reference, sample, train
from dpo_ray.tracking import Tracker, numeric

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
    if not ray.is_initialized():
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(address=cfg.run.ray_address, runtime_env={"env_vars": forwarded_env(os.environ)})
        # ray.init replaces the SIGTERM handler (its core worker's ends in abort(), without unwinding); put back
        # the one the CLI set (cli._sigterm_unwinds), which ends open MLflow runs FAILED.
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
    if cfg.run.check_resources:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        largest = {k: max(n.get(k, 0.0) for n in nodes) for k in set().union(*nodes)}
        check_resources(cfg, ray.cluster_resources(), largest)


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


class StageRunner:
    """Runs one stage into its folder unless a matching manifest says it is already done."""

    def __init__(self, cfg: PipelineConfig, tracker: Tracker | None):
        self.cfg = cfg
        self.tracker = tracker

    def __call__(self, name: str, final: Path, inputs: dict, fn: Callable[[Path, str | None, str], dict]) -> dict:
        key = artifacts.input_key(inputs)
        done = artifacts.read_manifest(final)
        if done and done.get("key") == key:
            print(f"[dpo-ray] {name}: up to date, skipped ({final})", flush=True)
            if self.tracker:
                self.tracker.log_skip(name)
            return done
        tmp = artifacts.partial_dir(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"[dpo-ray] {name}: running -> {final}", flush=True)
        started = time.time()
        with _disk_full_is_clear(name, final, tmp):
            if self.tracker:
                with self.tracker.stage(name, inputs, final) as run_id:
                    stats = fn(tmp, run_id, key)
                    manifest = self._manifest(name, key, inputs, stats, started)
                    self.tracker.log_stage({**stats, "seconds": manifest["seconds"]}, tmp)
                    manifest = artifacts.publish(tmp, final, manifest)
                    self.tracker.mlflow.log_artifact(str(final / artifacts.MANIFEST))
            else:
                stats = fn(tmp, None, key)
                manifest = artifacts.publish(tmp, final, self._manifest(name, key, inputs, stats, started))
        print(f"[dpo-ray] {name}: done in {manifest['seconds']:.0f}s {stats}", flush=True)
        return manifest

    @staticmethod
    def _manifest(name, key, inputs, stats, started) -> dict:
        return {"stage": name, "key": key, "inputs": inputs, "stats": stats, "seconds": time.time() - started}


@dataclass
class PreparedPairs:
    """What training needs: the pairs with their reference log-probs, and the held-out prompts (if any)."""

    reference_dir: Path
    reference_digest: str
    prompts_path: Path | None
    label_stats: dict


def prepare_pairs(cfg: PipelineConfig, out: Path, stage: "StageRunner") -> PreparedPairs:
    """sample -> label -> reference (or import preference data -> reference) into `out`."""
    if cfg.data.preferences:
        labeled = stage("label", out / "label", keys.import_preferences(cfg),
                        lambda tmp, _run, _key: label.import_preferences(cfg, str(tmp)))
        prompts_path = None
    else:
        sampled = stage("sample", out / "sample", keys.sample(cfg), lambda tmp, _run, _key: sample.run(cfg, str(tmp)))
        prompts_path = out / "sample" / "prompts.parquet"
        labeled = stage("label", out / "label", keys.label(cfg, sampled["output_digest"]),
                        lambda tmp, _run, _key: label.run(cfg, str(out / "sample" / "completions"), str(tmp),
                                                          sampled_by=cfg.model.policy))
    referenced = stage("reference", out / "reference", keys.reference(cfg, labeled["output_digest"]),
                       lambda tmp, _run, _key: reference.run(cfg, str(out / "label" / "pairs"), str(tmp)))
    return PreparedPairs(out / "reference", referenced["output_digest"], prompts_path, labeled["stats"])


def train_policy(cfg: PipelineConfig, out: Path, stage: "StageRunner", pairs: PreparedPairs) -> dict:
    """train into `out/train`; returns its manifest."""
    return stage("train", out / "train", keys.train(cfg, pairs.reference_digest),
                 lambda tmp, run_id, key: train.run(cfg, str(pairs.reference_dir), str(tmp), key, run_id))


def evaluate_policy(cfg: PipelineConfig, out: Path, stage: "StageRunner", pairs: PreparedPairs, trained: dict,
                    baseline: str) -> dict:
    """evaluate `out/train`'s policy against `baseline` into `out/evaluate`; returns {"policy", "metrics"}."""
    d = cfg.data
    policy_path = str(out / "train" / train.POLICY_DIR)

    def evaluate_fn(tmp: Path, _run, _key) -> dict:
        path = pairs.prompts_path
        if path is None:
            if not d.prompts:
                raise ConfigError("data.prompts: evaluation of an offline run needs held-out prompts")
            sample.prepare_prompts(cfg, tmp)
            path = tmp / "prompts.parquet"
        return evaluate.run(cfg, str(path), policy_path, str(tmp), baseline)

    prompts_digest = keys.source_digest(d.prompts, "data.prompts") if d.prompts else None
    evaluated = stage("evaluate", out / "evaluate",
                      keys.evaluate(cfg, trained["output_digest"], baseline, prompts_digest), evaluate_fn)
    return {"policy": policy_path, "metrics": evaluated["stats"]}


def train_and_evaluate(cfg: PipelineConfig, out: Path, stage: "StageRunner", pairs: PreparedPairs,
                       baseline: str) -> dict:
    """train -> evaluate into `out`; returns {"policy": path, "metrics": evaluation metrics}."""
    return evaluate_policy(cfg, out, stage, pairs, train_policy(cfg, out, stage, pairs), baseline)


def run_round(cfg: PipelineConfig, out: Path, stage: "StageRunner", baseline: str) -> dict:
    """One round into `out`: {"policy", "metrics", "label"}; the policy is judged against `baseline`."""
    pairs = prepare_pairs(cfg, out, stage)
    return {**train_and_evaluate(cfg, out, stage, pairs, baseline), "label": pairs.label_stats}


def start(cfg: PipelineConfig) -> tuple[Tracker, StageRunner]:
    """Checks and connections every driver needs before its first stage."""
    if cfg.data.num_eval_prompts == 0:
        raise ConfigError("data.num_eval_prompts: 0 leaves nothing to evaluate the policy on; a pipeline run needs "
                          "at least 1 (the sample stage alone accepts 0)")
    check_run_root(cfg)
    check_writable(cfg.run_dir)
    init_ray(cfg)
    # Built-in models are prepared here, once, before any actor asks for them.
    for spec in {cfg.model.policy, cfg.reference_model}:
        resolve_model(spec)
    tracker = Tracker(cfg)
    return tracker, StageRunner(cfg, tracker)


def run_pipeline(cfg: PipelineConfig) -> dict:
    """rounds.count rounds of on-policy (or, with data.preferences, offline) DPO; returns the last metrics.

    One round writes `<run dir>/<stage>/`; several write `<run dir>/round_<k>/<stage>/`, round k sampling from
    round k-1's policy. Every round is evaluated against the initial reference model.
    """
    run_dir = cfg.run_dir
    tracker, stage = start(cfg)
    baseline = cfg.reference_model
    rounds: list[dict] = []
    with tracker.parent() as parent:
        previous = None
        for k in range(1, cfg.rounds.count + 1):
            cfg_k = round_config(cfg, k, previous)
            if cfg.rounds.count == 1:
                result = run_round(cfg_k, run_dir, stage, baseline)
            else:
                print(f"[dpo-ray] round {k}/{cfg.rounds.count}", flush=True)
                with tracker.child(f"round_{k}"):
                    result = run_round(cfg_k, run_dir / f"round_{k}", stage, baseline)
                    tracker.mlflow.log_metrics(numeric(result["metrics"]))
            rounds.append({"round": k, **result})
            previous = result["policy"]
        evaluate_dir = run_dir / ("evaluate" if cfg.rounds.count == 1 else f"round_{cfg.rounds.count}/evaluate")
        metrics = rounds[-1]["metrics"]
        tracker.mlflow.log_metrics({f"eval/{k}": v for k, v in numeric(metrics).items()})
        for name in ("reward_vs_kl.png", "examples.md", "metrics.json"):
            tracker.mlflow.log_artifact(str(evaluate_dir / name))
        if cfg.rounds.count > 1:
            table = write_round_report(rounds, run_dir)
            for name in ("rounds.json", "rounds.md", "rounds.png"):
                tracker.mlflow.log_artifact(str(run_dir / name))
            print("\n" + table)
        summary = {"run_dir": str(run_dir), "policy": rounds[-1]["policy"], "mlflow_run_id": parent.info.run_id,
                   "tracking_uri": tracker.uri, "metrics": metrics, "rounds": len(rounds)}
    _print_summary(summary)
    return summary


def run_frontier(cfg: PipelineConfig) -> dict:
    """The paper's reward-KL frontier: one policy per (loss, beta) trained on the same pairs and reference
    log-probs (computed once), each evaluated on the same held-out prompts against the reference.

    The variants train as concurrent Ray Train runs, as many at once as the cluster holds
    (config.concurrent_trainings); evaluations then run one after another, each using the whole cluster.
    """
    run_dir = cfg.run_dir
    tracker, stage = start(cfg)
    variants = {f"{loss}_beta{beta:g}": build_config(merge(cfg.model_dump(mode="json"),
                                                           {"train": {"loss": loss, "beta": beta}}))
                for loss in cfg.frontier.losses for beta in cfg.frontier.betas}
    at_once = concurrent_trainings(cfg, ray.cluster_resources(), len(variants))
    points = []
    with tracker.parent() as parent:
        pairs = prepare_pairs(cfg, run_dir, stage)
        run_ids = {}
        for name in variants:
            with tracker.child(name) as child:
                run_ids[name] = child.info.run_id
        print(f"[dpo-ray] frontier: training {len(variants)} variants, {at_once} at a time", flush=True)

        def train_variant(name: str) -> dict:
            variant = variants[name]
            if at_once > 1 and variant.run.torch_threads == 0:
                # Concurrent runs share the node: each worker keeps to its own CPUs instead of all cores.
                variant = variant.model_copy(update={"run": variant.run.model_copy(
                    update={"torch_threads": max(1, int(variant.train.cpus_per_worker))})})
            # MLflow's active run is per thread: reopen this variant's run here so its train stage nests under it.
            with tracker.mlflow.start_run(run_id=run_ids[name]):
                return train_policy(variant, run_dir / "frontier" / name, stage, pairs)

        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="frontier") as pool:
            trained = dict(zip(variants, pool.map(train_variant, variants)))
        for name, variant in variants.items():
            print(f"[dpo-ray] frontier: evaluate {name}", flush=True)
            with tracker.child(name):
                result = evaluate_policy(variant, run_dir / "frontier" / name, stage, pairs, trained[name],
                                         cfg.reference_model)
                tracker.mlflow.log_metrics(numeric(result["metrics"]))
            t = variant.train
            points.append({"variant": name, "loss": t.loss, "beta": t.beta, **result["metrics"]})
        table = write_frontier_report(points, run_dir)
        for name in ("frontier.json", "frontier.md", "frontier.png"):
            tracker.mlflow.log_artifact(str(run_dir / name))
    print("\n" + table)
    print(f"\n[dpo-ray] frontier written to {run_dir} (MLflow run {parent.info.run_id} in {tracker.uri})")
    return {"run_dir": str(run_dir), "points": points}


def write_frontier_report(points: list[dict], run_dir: Path) -> str:
    """frontier.json, frontier.md (returned) and frontier.png: reward against KL, one line per loss type."""
    artifacts.write_json_atomic(run_dir / "frontier.json", {"points": points})
    lines = ["| variant | loss | beta | policy reward | reference reward | win rate | KL |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['variant']} | {p['loss']} | {p['beta']:g} | {p['policy_reward']:+.3f} | "
              f"{p['reference_reward']:+.3f} | {p['win_rate']:.1%} | {p['kl']:.2f} |" for p in points]
    table = "\n".join(lines)
    (run_dir / "frontier.md").write_text(table + "\n")
    evaluate.plot_reward_vs_kl(
        [{"label": "reference", "kl": 0.0, "reward": points[0]["reference_reward"]}]
        + [{"label": f"{p['loss']} beta={p['beta']:g}", "kl": p["kl"], "kl_stderr": p["kl_stderr"],
            "reward": p["policy_reward"], "reward_stderr": p["policy_reward_stderr"]} for p in points],
        run_dir / "frontier.png", "reward-KL frontier (held-out prompts)",
    )
    return table


def write_round_report(rounds: list[dict], run_dir: Path) -> str:
    """rounds.json, rounds.md (the table, also returned) and rounds.png: each round against the initial model."""
    rows = []
    for r in rounds:
        m, lab = r["metrics"], r["label"]
        rows.append({"round": r["round"], "policy_reward": m["policy_reward"], "initial_reward": m["reference_reward"],
                     "win_rate_vs_initial": m["win_rate"], "kl_to_initial": m["kl"], "pairs": lab.get("pairs"),
                     "tie_rate": lab.get("ties_dropped", 0) / max(lab.get("prompts", 0), 1)})
    artifacts.write_json_atomic(run_dir / "rounds.json", {"rounds": rows})
    header = "| round | policy reward | initial reward | win rate vs initial | KL to initial | pairs | tie rate |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['policy_reward']:+.3f} | {r['initial_reward']:+.3f} | "
              f"{r['win_rate_vs_initial']:.1%} | {r['kl_to_initial']:.2f} | {r['pairs']} | {r['tie_rate']:.1%} |"
              for r in rows]
    table = "\n".join(lines)
    (run_dir / "rounds.md").write_text(table + "\n")
    evaluate.plot_reward_vs_kl(
        [{"label": "initial", "kl": 0.0, "reward": rows[0]["initial_reward"]}]
        + [{"label": f"round {r['round']}", "kl": r["kl_to_initial"], "reward": r["policy_reward"]} for r in rows],
        run_dir / "rounds.png", "round over round, against the initial model",
    )
    return table


def _print_summary(summary: dict) -> None:
    m = summary["metrics"]
    print(f"\n[dpo-ray] finished ({summary['rounds']} round{'s' if summary['rounds'] > 1 else ''})")
    print(f"  run dir:        {summary['run_dir']}")
    print(f"  trained policy: {summary['policy']}")
    print(f"  held-out reward (last round): policy {m['policy_reward']:+.3f} vs reference {m['reference_reward']:+.3f}; "
          f"win rate {m['win_rate']:.1%}; KL {m['kl']:.2f} nats; implicit accuracy {m['implicit_accuracy']:.1%}")
    print(f"  MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    if summary["tracking_uri"].startswith("sqlite:///"):
        print(f"  view it: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1")
