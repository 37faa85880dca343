"""evaluate: the trained policy against the baseline (the reference model by default) on held-out prompts.

Both models sample `samples_per_prompt` completions per held-out prompt (temperature 1 by default); every
sample is scored by the labeler and by both models' log-probs (the training forward code, or for a sample's own
model with the transformers backend, the sampler's identical log-prob). Reported:
- mean reward of each model, and the policy's win rate: sample i of the policy against sample i of the
  reference on the same prompt, ties counting one half;
- KL(pi || pi_ref) per sequence, the Monte-Carlo mean of log pi(y|x) - log pi_ref(y|x) over policy samples;
- implicit-reward accuracy on held-out pairs: among each prompt's samples of both models, the best and worst
  under the labeler form a pair, and the policy's implicit reward beta*log(pi/pi_ref) should rank them alike;
- each model's text quality (dpo_ray.quality, keys `policy_*` and `reference_*`): fluency under the baseline,
  distinct-1/2, repeated 3-grams, non-dictionary words, non-word tokens, EOS endings, staying on task; a reward can
  rise while these fall (self-labeling rounds do).
Without GPUs (reference.share_actor) one actor holds both models, samples each one's share of the prompts with it and
scores every sample with both: one actor pool in all, where a pool per model would start every process twice.
The baseline's side (its samples and their log-probs under it) depends on neither the policy nor the labelers, so
with reference.cache it is kept under <run.root>/eval_reference_cache/ (reference_side_folder), with the rewards of each
labeler that reads a completion alone beside it, and a later evaluation against the same baseline, prompts, seed and
sampling settings (the next round, a frontier variant, a rerun) samples and scores only the policy's side
(`reference_samples_from_cache`, and `reference_rewards_from_cache` labelers, in the metrics). The judge compares
the two sides, so it judges both every time.
Writes eval_samples.parquet, metrics.json, reward_vs_kl.png and examples.md. Without a `prompts` source (an offline
run) the held-out prompts are split from data.prompts here, as the sample stage would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from dpo_ray import artifacts, keys, schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import ConfigError
from dpo_ray.models import inference_dtype, model_fingerprint
from dpo_ray.ops.prompts import held_out_prompts, read_split
from dpo_ray.ops.rewards import add_rewards, check_labeler, labeler
from dpo_ray.ops.scorers import completion_logps_columns, each_sampled_with_logps
from dpo_ray.pairs import build_pairs
from dpo_ray.quality import MOVIE_REVIEW_WORDS, divergence, text_quality
from dpo_ray.reports import plot_reward_vs_kl
from dpo_ray.runner import StageContext

SOURCES = {"prompts": True, "policy": True}


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    if "prompts" not in digests and not cfg.data.prompts:
        raise ConfigError("data.prompts: evaluation of an offline run needs held-out prompts")
    prompts = keys.held_out_prompts(cfg, digests)
    judges = {cfg.evaluate.labeler or cfg.label.labeler, *cfg.evaluate.audit_labelers}
    return {"policy": digests["policy"], "baseline": model_fingerprint(cfg.baseline_model), "prompts": prompts,
            "seed": cfg.held_out_seed, "dtype": inference_dtype(cfg.model.dtype), "limits": keys.limits(cfg),
            "evaluate": keys.settings(cfg, "evaluate"), "sample": cfg.sample.model_dump(),
            "labeler": keys.settings(cfg, "label"),
            "reward_model": model_fingerprint(cfg.label.reward_model) if "reward_model" in judges else None,
            **({"judge": keys.judge_fingerprint(cfg)} if "judge" in judges else {}), "beta": cfg.train.beta}


def _stderr(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def _reward_metrics(by_model: dict, samples: dict, reward) -> dict:
    """Each model's mean `reward(row)` and the policy's win rate: its sample i against the baseline's sample i of
    the same prompt, ties counting one half."""
    rewards = {model: [reward(r) for r in by_model[model]] for model in ("policy", "reference")}
    wins = []
    for per_prompt in samples.values():
        for (model, index), r in per_prompt.items():
            other = per_prompt.get(("reference", index))
            if model == "policy" and other is not None:
                mine, theirs = reward(r), reward(other)
                wins.append(1.0 if mine > theirs else 0.5 if mine == theirs else 0.0)
    return {"policy_reward": _mean(rewards["policy"]), "policy_reward_stderr": _stderr(rewards["policy"]),
            "reference_reward": _mean(rewards["reference"]), "reference_reward_stderr": _stderr(rewards["reference"]),
            "win_rate": _mean(wins), "win_rate_stderr": _stderr(wins)}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def compute_metrics(rows: list[dict], beta: float, on_task_words: Sequence[str] = MOVIE_REVIEW_WORDS) -> dict:
    """Metrics from EVAL_SAMPLES rows (pure; unit-tested), with each model's text quality (quality.text_quality)
    and, for each audit labeler in the rows' `audit_rewards`, its rewards and win rate as `audit_<name>_*`."""
    by_model = defaultdict(list)
    samples = defaultdict(dict)
    for r in rows:
        by_model[r["model"]].append(r)
        samples[r["prompt_id"]][(r["model"], r["sample_index"])] = r
    kl_terms = [r["policy_logp"] - r["reference_logp"] for r in by_model["policy"]]
    correct = []
    for per_prompt in samples.values():
        items = list(per_prompt.values())
        pairs, _ = build_pairs([r["completion"] for r in items], [r["reward"] for r in items])
        for c, j in pairs:
            implicit = [beta * (items[i]["policy_logp"] - items[i]["reference_logp"]) for i in (c, j)]
            correct.append(float(implicit[0] > implicit[1]))
    metrics = {
        **_reward_metrics(by_model, samples, lambda r: r["reward"]),
        "kl": _mean(kl_terms),
        "kl_stderr": _stderr(kl_terms),
        "implicit_accuracy": _mean(correct),
        "held_out_pairs": len(correct),
        "eval_prompts": len(samples),
        "policy_completion_tokens": _mean([r["completion_tokens"] for r in by_model["policy"]]),
        "reference_completion_tokens": _mean([r["completion_tokens"] for r in by_model["reference"]]),
    }
    for name in sorted({name for r in rows for name, _ in r.get("audit_rewards") or ()}):
        audit = _reward_metrics(by_model, samples, lambda r, name=name: dict(r["audit_rewards"])[name])
        metrics.update({f"audit_{name}_{key}": value for key, value in audit.items()})
    # Fluency is judged by `reference_logp`: "reference" in EVAL_SAMPLES is the baseline model (cfg.baseline_model:
    # the initial reference in every round), so both models' completions are scored by the same fixed model.
    for model in ("policy", "reference"):
        quality = text_quality(by_model[model], on_task_words, fluency_column="reference_logp")
        metrics.update({f"{model}_{name}": value for name, value in quality.items()})
    return metrics


def _examples_markdown(rows: list[dict], count: int) -> str:
    by_prompt = defaultdict(dict)
    for r in rows:
        if r["sample_index"] == 0:
            by_prompt[r["prompt_id"]][r["model"]] = r
    lines = ["# Example completions (sample 0 of each model)", ""]
    for prompt_id in sorted(by_prompt)[:count]:
        pair = by_prompt[prompt_id]
        if len(pair) < 2:
            continue
        lines += [f"## {prompt_id}: {pair['policy']['prompt']}", ""]
        for model in ("reference", "policy"):
            text = pair[model]["completion"].replace("\n", " ")
            lines.append(f"- **{model}** (reward {pair[model]['reward']:+.3f}): {text}")
        lines.append("")
    return "\n".join(lines)


def _sample_args(cfg: PipelineConfig) -> tuple[int, int, float, int]:
    """(n, max_new_tokens, temperature, seed) of both models' held-out samples."""
    e = cfg.evaluate
    return e.samples_per_prompt, e.max_new_tokens or cfg.sample.max_new_tokens, e.temperature, cfg.held_out_seed + 1


def _logp_columns(cfg: PipelineConfig, policy: str) -> list[tuple[str, str]]:
    return [(policy, "policy_logp"), (cfg.baseline_model, "reference_logp")]


def reference_side_folder(cfg: PipelineConfig, prompts_path: Path) -> Path:
    """Where the baseline's side of an evaluation is cached: named by all that determines its samples and their
    log-probs (the baseline's weights and dtype, the held-out prompts and how they are cut, the seed and the
    sampling settings), not by the batch and actor settings, which a completion does not depend on (ops/samplers)."""
    e, s = cfg.evaluate, cfg.sample
    prompts = pq.read_table(prompts_path, columns=["prompt_id", "prompt", "messages_json"],
                            filters=[("split", "==", "eval")])
    key = artifacts.input_key({
        "baseline": model_fingerprint(cfg.baseline_model), "dtype": inference_dtype(cfg.model.dtype),
        "prompts": prompts.to_pydict(), "limits": keys.limits(cfg), "seed": cfg.held_out_seed, "backend": s.backend,
        "n": e.samples_per_prompt, "max_new_tokens": e.max_new_tokens or s.max_new_tokens, "temperature": e.temperature,
        "top_p": s.top_p})
    return Path(cfg.run.root).resolve() / "eval_reference_cache" / key


def _cached_reference_side(cfg: PipelineConfig, folder: Path, policy: str) -> ray.data.Dataset | None:
    """The baseline's samples kept in `folder` (schemas.EVAL_REFERENCE) with the policy's log-probs of them, or None
    where reference.cache is off or nothing is kept there."""
    if not (cfg.reference.cache and folder.is_dir()):
        return None
    schemas.check_folder(folder, schemas.EVAL_REFERENCE)
    cached = ray.data.read_parquet(str(folder)).materialize()
    return completion_logps_columns(cached, cfg, [(policy, "policy_logp")]).materialize()


def _keep_reference_side(cfg: PipelineConfig, samples: ray.data.Dataset, folder: Path) -> None:
    """With reference.cache, keep the baseline's samples and their log-probs under it (schemas.EVAL_REFERENCE) for
    the next evaluation against the same baseline (later rounds, frontier variants, reruns), published by a rename
    so a reader never sees part of them."""
    if not cfg.reference.cache:
        return
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    samples.filter(expr=col("model") == "reference").map_batches(
        lambda b: b.select(schemas.EVAL_REFERENCE.names).cast(schemas.EVAL_REFERENCE),
        batch_format="pyarrow").write_parquet(str(partial))
    try:
        os.replace(partial, folder)
    except OSError:  # another evaluation published the same samples first
        shutil.rmtree(partial, ignore_errors=True)


def _labelers(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(labeler, the column it fills) for evaluate's labeler and each audit labeler."""
    e = cfg.evaluate
    return [(e.labeler or cfg.label.labeler, "reward"), *((name, f"audit_{name}") for name in e.audit_labelers)]


def _rewards_file(cfg: PipelineConfig, folder: Path, name: str) -> Path | None:
    """Where the baseline side's rewards from labeler `name` are kept beside its samples in `folder`: named by what
    a completion's reward depends on (Labeler.completion_key); None where that is more than the completion."""
    key = labeler(cfg, name).completion_key()
    if not cfg.reference.cache or key is None:
        return None
    return folder.with_name(f"{folder.name}.rewards") / f"{artifacts.input_key(key)}.parquet"


def _sample_keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))


def _kept_rewards(cfg: PipelineConfig, reference: ray.data.Dataset, folder: Path) -> dict[str, dict]:
    """{column: {(prompt_id, sample_index): reward}} for each labeler whose rewards of every one of the baseline's
    cached samples are kept beside them."""
    samples = {(r["prompt_id"], r["sample_index"])
               for r in reference.select_columns(["prompt_id", "sample_index"]).take_all()}
    kept = {}
    for name, column in _labelers(cfg):
        path = _rewards_file(cfg, folder, name)
        if path is not None and path.is_file():
            table = schemas.read_table(path, schemas.EVAL_REFERENCE_REWARDS)
            rewards = dict(zip(_sample_keys(table), table["reward"].to_pylist()))
            if rewards.keys() == samples:
                kept[column] = rewards
    return kept


def _keep_rewards(cfg: PipelineConfig, rows: list[dict], folder: Path) -> None:
    """Keep the baseline side's rewards from each labeler that reads a completion alone, for the next evaluation of
    the same samples (schemas.EVAL_REFERENCE_REWARDS), published whole."""
    baseline = [r for r in rows if r["model"] == "reference"]
    for name, column in _labelers(cfg):
        path = _rewards_file(cfg, folder, name)
        if path is None or path.is_file():
            continue
        rewards = [r["reward"] if column == "reward" else dict(r["audit_rewards"])[name] for r in baseline]
        artifacts.write_parquet_atomic(schemas.to_table(
            {"prompt_id": [r["prompt_id"] for r in baseline], "sample_index": [r["sample_index"] for r in baseline],
             "reward": rewards}, schemas.EVAL_REFERENCE_REWARDS), path)


def _with_rewards(ds: ray.data.Dataset, kept: dict[str, dict]) -> ray.data.Dataset:
    def append(batch: pa.Table) -> pa.Table:
        for column, rewards in kept.items():
            batch = batch.append_column(column, pa.array([rewards[k] for k in _sample_keys(batch)], pa.float64()))
        return batch

    return ds.map_batches(append, batch_format="pyarrow") if kept else ds


def _samples(cfg: PipelineConfig, eval_prompts: ray.data.Dataset, policy: str,
             folder: Path) -> tuple[ray.data.Dataset, bool, int]:
    """Both models' samples of the held-out prompts, each scored by both models and by the labelers; whether the
    baseline's side came from the cache `folder`, and for how many labelers its rewards did too."""
    reference = _cached_reference_side(cfg, folder, policy)
    if reference is None:
        judged = each_sampled_with_logps(eval_prompts, cfg, {"policy": policy, "reference": cfg.baseline_model},
                                         *_sample_args(cfg), _logp_columns(cfg, policy))
        _keep_reference_side(cfg, judged, folder)
        kept = {}
    else:
        kept = _kept_rewards(cfg, reference, folder)
        policy_side = each_sampled_with_logps(eval_prompts, cfg, {"policy": policy}, *_sample_args(cfg),
                                              _logp_columns(cfg, policy))
        for name, column in _labelers(cfg):
            if column in kept:
                policy_side = add_rewards(policy_side, cfg, name, column=column).materialize()
        # Each side materialized: one actor pool at a time, and no task waits upstream of one.
        judged = policy_side.union(_with_rewards(reference, kept).materialize())
    for name, column in _labelers(cfg):
        if column not in kept:
            # Materialized first, as in label: one scorer's actor pool at a time.
            judged = add_rewards(judged.materialize(), cfg, name, column=column)
    return judged, reference is not None, len(kept)


def _to_eval_schema(b: pa.Table, audits: Sequence[str]) -> pa.Table:
    b = b.append_column("completion_tokens", pa.compute.list_value_length(b["completion_ids"]).cast(pa.int32()))
    scores = [b[f"audit_{name}"].to_pylist() for name in audits]
    audit_rewards = [list(zip(audits, row)) for row in zip(*scores)] if audits else [[]] * b.num_rows
    b = b.append_column("audit_rewards", pa.array(audit_rewards, schemas.EVAL_SAMPLES.field("audit_rewards").type))
    return b.select(schemas.EVAL_SAMPLES.names).cast(schemas.EVAL_SAMPLES)


def run(ctx: StageContext) -> dict:
    """Judge the `policy` source against cfg.baseline_model on the held-out prompts."""
    cfg, out = ctx.cfg, ctx.out
    for name, _ in _labelers(cfg):
        check_labeler(cfg, name)
    prompts_path = held_out_prompts(ctx.cfg, ctx.sources, ctx.out)
    # The split is read first: it is what names a file that is not a sample stage's prompts.parquet.
    eval_prompts = read_split(prompts_path, "eval")
    folder = reference_side_folder(cfg, prompts_path)
    samples, cached, rewards_kept = _samples(cfg, eval_prompts, str(ctx.sources["policy"]), folder)
    samples.map_batches(_to_eval_schema, fn_args=(cfg.evaluate.audit_labelers,),
                        batch_format="pyarrow").write_parquet(str(out / "eval_samples"))
    rows = schemas.read_table(out / "eval_samples", schemas.EVAL_SAMPLES).to_pylist()
    _keep_rewards(cfg, rows, folder)
    metrics = compute_metrics(rows, cfg.train.beta, cfg.evaluate.on_task_words)
    # Against the baseline alone; a round's report compares with the round before too (reports.write_round_report).
    reasons = divergence(metrics, tolerance=cfg.evaluate.quality_tolerance)
    metrics.update({"divergence": float(bool(reasons)), "divergence_reasons": reasons,
                    "reference_samples_from_cache": float(cached),
                    "reference_rewards_from_cache": float(rewards_kept)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_reward_vs_kl(
        [{"label": "reference", "kl": 0.0, "reward": metrics["reference_reward"],
          "reward_stderr": metrics["reference_reward_stderr"]},
         {"label": f"DPO policy (beta={cfg.train.beta}, {cfg.train.loss})", "kl": metrics["kl"],
          "kl_stderr": metrics["kl_stderr"], "reward": metrics["policy_reward"],
          "reward_stderr": metrics["policy_reward_stderr"]}],
        out / "reward_vs_kl.png", f"{cfg.run.name}: win rate {metrics['win_rate']:.0%}",
    )
    (out / "examples.md").write_text(_examples_markdown(rows, cfg.evaluate.num_examples))
    return metrics
