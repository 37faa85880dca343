"""The DAG: sample -> label -> reference -> train -> evaluate, driven from plain Python on a Ray cluster.

Each stage runs through `runner.StageRunner` into `<run dir>/<stage>/`, skipped when its manifest matches its
inputs, so rerunning a finished or interrupted run only does what is missing; training resumes inside the stage
from its Ray Train checkpoints. `run_pipeline` repeats the round `rounds.count` times (round k sampling from round
k-1's policy); `run_frontier` trains one policy per (loss, beta) on one set of pairs.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray

from dpo_ray.cluster import check_run_root, init_ray
from dpo_ray.config import PipelineConfig, build_config, concurrent_trainings, merge, round_config
from dpo_ray.engines import POLICY_DIR
from dpo_ray.errors import ConfigError
from dpo_ray.losses import REFERENCE_FREE
from dpo_ray.models import resolve_model
from dpo_ray.reports import print_summary, report, write_frontier_report, write_round_report
from dpo_ray.runner import StageRunner, check_writable
from dpo_ray.quality import divergence
from dpo_ray.stages import evaluate, label, reference, sample, soft_update, train
from dpo_ray.tracking import Tracker, numeric

log = logging.getLogger(__name__)


@dataclass
class PreparedPairs:
    """What training needs: the pairs with their reference log-probs (the label stage's pairs alone for a
    reference-free loss), and the held-out prompts (if any)."""

    reference_dir: Path
    prompts_path: Path | None
    label_stats: dict


def prepare_pairs(cfg: PipelineConfig, out: Path, stage: StageRunner, replay: list[Path] = (),
                  losses: list[str] | None = None) -> PreparedPairs:
    """sample -> label -> reference (or import preference data -> reference) into `out`; `replay`: earlier rounds'
    pair folders the reference stage draws reference.replay_share of its pairs from. The reference stage runs
    unless every loss to train (`losses`, default train.loss) is reference-free."""
    if cfg.data.preferences:
        labeled = stage(label, cfg, out / "label")
        prompts_path = None
    else:
        stage(sample, cfg, out / "sample")
        prompts_path = out / "sample" / "prompts.parquet"
        labeled = stage(label, cfg, out / "label", {"completions": out / "sample" / "completions"},
                        sampled_by=cfg.model.policy)
    trained = set(losses or [cfg.train.loss])
    if trained <= set(REFERENCE_FREE):
        log.info(f"reference: skipped, {' and '.join(sorted(trained))} need(s) no reference log-probs")
        return PreparedPairs(out / "label" / "pairs", prompts_path, labeled["stats"])
    replayed = {"replay": list(replay)} if replay and cfg.reference.replay_share > 0 else {}
    stage(reference, cfg, out / "reference", {"pairs": out / "label" / "pairs", **replayed})
    return PreparedPairs(out / "reference", prompts_path, labeled["stats"])


def train_policy(cfg: PipelineConfig, out: Path, stage: StageRunner, pairs: PreparedPairs) -> Path:
    """train into `out/train`; returns the trained policy's folder."""
    held_out = {"prompts": pairs.prompts_path} if cfg.train.kl_budget is not None and pairs.prompts_path else {}
    stage(train, cfg, out / "train", {"reference": pairs.reference_dir, **held_out})
    return out / "train" / POLICY_DIR


def evaluate_policy(cfg: PipelineConfig, out: Path, stage: StageRunner, pairs: PreparedPairs, policy: Path) -> dict:
    """evaluate `policy` against cfg.baseline_model into `out/evaluate`; returns {"policy", "metrics"}."""
    sources = {"policy": policy, **({"prompts": pairs.prompts_path} if pairs.prompts_path else {})}
    evaluated = stage(evaluate, cfg, out / "evaluate", sources)
    return {"policy": str(policy), "metrics": evaluated["stats"]}


def run_round(cfg: PipelineConfig, out: Path, stage: StageRunner, replay: list[Path] = ()) -> dict:
    """One round into `out`: {"policy", "metrics", "label"}."""
    pairs = prepare_pairs(cfg, out, stage, replay)
    policy = train_policy(cfg, out, stage, pairs)
    return {**evaluate_policy(cfg, out, stage, pairs, policy), "label": pairs.label_stats}


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
    return tracker, StageRunner(tracker)


def run_pipeline(cfg: PipelineConfig) -> dict:
    """rounds.count rounds of on-policy (or, with data.preferences, offline) DPO; returns the last metrics.

    One round writes `<run dir>/<stage>/`; several write `<run dir>/round_<k>/<stage>/`, round k sampling from
    round k-1's policy. Every round is evaluated against the initial reference model.
    """
    run_dir = cfg.run_dir
    tracker, stage = start(cfg)
    rounds: list[dict] = []
    with tracker.parent() as parent:
        cfg_k = None
        for k in range(1, cfg.rounds.count + 1):
            if cfg.rounds.count == 1:
                cfg_k = round_config(cfg, k)
                result = run_round(cfg_k, run_dir, stage)
            else:
                log.info(f"round {k}/{cfg.rounds.count}")
                earlier = [run_dir / f"round_{j}" / "label" / "pairs" for j in range(1, k)]
                with tracker.child(f"round_{k}"):
                    cfg_k = _next_round(cfg, k, cfg_k, rounds, stage)
                    result = run_round(cfg_k, run_dir / f"round_{k}", stage, earlier)
                    reasons = divergence(result["metrics"], rounds[-1]["metrics"] if rounds else None,
                                         cfg.evaluate.quality_tolerance)
                    tracker.mlflow.log_metrics({**numeric(result["metrics"]), "divergence": float(bool(reasons))})
                for reason in reasons:
                    log.warning(f"round {k}: divergence: {reason}")
            rounds.append({"round": k, **result})
        _log_last_round(tracker, cfg, rounds)
        summary = {"run_dir": str(run_dir), "policy": rounds[-1]["policy"], "mlflow_run_id": parent.info.run_id,
                   "tracking_uri": tracker.uri, "metrics": rounds[-1]["metrics"], "rounds": len(rounds)}
    print_summary(summary)
    return summary


def _next_round(cfg: PipelineConfig, k: int, previous: PipelineConfig | None, rounds: list[dict],
                stage: StageRunner) -> PipelineConfig:
    """Round k's config; with rounds.reference=soft, its reference is blended first (stages/soft_update.py)."""
    if previous is None:
        return round_config(cfg, k)
    policy = rounds[-1]["policy"]
    soft = None
    if cfg.rounds.reference == "soft":
        soft = cfg.run_dir / f"round_{k}" / "soft_update"
        stage(soft_update, previous, soft, {"policy": Path(policy)})
        soft = str(soft)
    return round_config(cfg, k, policy, previous.reference_model, soft)


def _log_last_round(tracker: Tracker, cfg: PipelineConfig, rounds: list[dict]) -> None:
    """The last round's evaluation on the parent run, and with several rounds the round-over-round report."""
    run_dir = cfg.run_dir
    evaluate_dir = run_dir / ("evaluate" if cfg.rounds.count == 1 else f"round_{cfg.rounds.count}/evaluate")
    tracker.mlflow.log_metrics({f"eval/{k}": v for k, v in numeric(rounds[-1]["metrics"]).items()})
    for name in ("reward_vs_kl.png", "examples.md", "metrics.json"):
        tracker.mlflow.log_artifact(str(evaluate_dir / name))
    if cfg.rounds.count > 1:
        table = write_round_report(rounds, run_dir, cfg.evaluate.quality_tolerance)
        for name in ("rounds.json", "rounds.md", "rounds.png"):
            tracker.mlflow.log_artifact(str(run_dir / name))
        report.info("\n" + table)


def _frontier_variants(cfg: PipelineConfig) -> dict[str, PipelineConfig]:
    return {f"{loss}_beta{beta:g}": build_config(merge(cfg.model_dump(mode="json"),
                                                       {"train": {"loss": loss, "beta": beta}}))
            for loss in cfg.frontier.losses for beta in cfg.frontier.betas}


def _train_concurrently(tracker: Tracker, stage: StageRunner, variants: dict[str, PipelineConfig],
                        pairs: PreparedPairs, at_once: int, run_dir: Path) -> dict[str, Path]:
    """Each variant's train stage, `at_once` at a time, nested under the variant's own MLflow run."""
    run_ids = {}
    for name in variants:
        with tracker.child(name) as child:
            run_ids[name] = child.info.run_id

    def train_variant(name: str) -> Path:
        variant = variants[name]
        if at_once > 1 and variant.run.torch_threads == 0:
            # Concurrent runs share the node: each worker keeps to its own CPUs instead of all cores.
            variant = variant.model_copy(update={"run": variant.run.model_copy(
                update={"torch_threads": max(1, int(variant.train.cpus_per_worker))})})
        # MLflow's active run is per thread: reopen this variant's run here so its train stage nests under it.
        with tracker.mlflow.start_run(run_id=run_ids[name]):
            return train_policy(variant, run_dir / "frontier" / name, stage, pairs)

    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="frontier") as pool:
        return dict(zip(variants, pool.map(train_variant, variants)))


def run_frontier(cfg: PipelineConfig) -> dict:
    """The paper's reward-KL frontier: one policy per (loss, beta) trained on the same pairs and reference
    log-probs (computed once), each evaluated on the same held-out prompts against the reference.

    The variants train as concurrent Ray Train runs, as many at once as the cluster holds
    (config.concurrent_trainings); evaluations then run one after another, each using the whole cluster.
    """
    run_dir = cfg.run_dir
    tracker, stage = start(cfg)
    variants = _frontier_variants(cfg)
    at_once = concurrent_trainings(cfg, ray.cluster_resources(), len(variants))
    points = []
    with tracker.parent() as parent:
        pairs = prepare_pairs(cfg, run_dir, stage, losses=cfg.frontier.losses)
        log.info(f"frontier: training {len(variants)} variants, {at_once} at a time")
        trained = _train_concurrently(tracker, stage, variants, pairs, at_once, run_dir)
        for name, variant in variants.items():
            log.info(f"frontier: evaluate {name}")
            with tracker.child(name):
                result = evaluate_policy(variant, run_dir / "frontier" / name, stage, pairs, trained[name])
                tracker.mlflow.log_metrics(numeric(result["metrics"]))
            t = variant.train
            points.append({"variant": name, "loss": t.loss, "beta": t.beta, **result["metrics"]})
        table = write_frontier_report(points, run_dir)
        for name in ("frontier.json", "frontier.md", "frontier.png"):
            tracker.mlflow.log_artifact(str(run_dir / name))
    report.info(f"\n{table}\n")
    log.info(f"frontier written to {run_dir} (MLflow run {parent.info.run_id} in {tracker.uri})")
    return {"run_dir": str(run_dir), "points": points}
