"""label: score completions and turn them into chosen/rejected pairs; or import existing preference data.

The labelers (sentiment lexicons, reward model, implicit reward, LLM judge) are in `ops/rewards.py`.
`label.filter_labeler` scores every completion a second time with another labeler (`filter_reward`) and keeps only
the pairs it does not contradict: implicit self-labels filtered by sentiment are then a config choice.
`label.fluency_guard` also drops implicit self-labels whose chosen completion the reference finds less likely per
token than the rejected.

Outputs: `scored/` (schemas.SCORED, every completion with its reward) and `pairs/` (schemas.PAIRS); an import
writes `pairs/` and the rejected rows, if any.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from dpo_ray import keys, schemas
from dpo_ray.config import LabelConfig, PipelineConfig
from dpo_ray.errors import InputError
from dpo_ray.inputs import Reject, read_preferences, write_rejects
from dpo_ray.models import load_tokenizer
from dpo_ray.ops.datasets import by_prompt, sum_columns
from dpo_ray.ops.rewards import add_rewards, check_labeler
from dpo_ray.pairs import PairStats, build_pairs
from dpo_ray.runner import StageContext
from dpo_ray.text import TokenizationError, completion_token_ids, prompt_token_ids

log = logging.getLogger(__name__)

# Without completions the stage imports data.preferences instead.
SOURCES = {"completions": False}


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    if "completions" not in digests:
        d = cfg.data
        return {**keys.policy(cfg), "preferences": keys.digest(d.preferences, "data.preferences"),
                "limits": keys.limits(cfg), "on_bad_rows": d.on_bad_rows, **keys.reading(cfg)}
    return {"completions": digests["completions"], "label": keys.settings(cfg, "label"),
            "labeler_models": keys.labeler_fingerprints(cfg)}


def run(ctx: StageContext) -> dict:
    if "completions" in ctx.sources:
        return label_completions(ctx.cfg, ctx.sources["completions"], ctx.out, ctx.sampled_by)
    return import_preferences(ctx.cfg, ctx.out)


def _group_pairs(group: pa.Table, lab: LabelConfig) -> tuple[list[dict], PairStats]:
    rows = sorted(group.to_pylist(), key=lambda r: r["sample_index"])
    index_pairs, stats = build_pairs(
        [r["completion"] for r in rows], [r["reward"] for r in rows], lab.pairing, lab.min_margin,
        [r["filter_reward"] for r in rows] if lab.filter_labeler else None, lab.filter_min_margin,
        [r["reference_token_logp"] for r in rows] if lab.fluency_guard is not None else None,
        lab.fluency_guard or 0.0)
    pairs = []
    for c, r in index_pairs:
        chosen, rejected = rows[c], rows[r]
        pairs.append({
            "pair_id": f"{chosen['prompt_id']}:{chosen['sample_index']}>{rejected['sample_index']}",
            "prompt_id": chosen["prompt_id"], "prompt": chosen["prompt"], "prompt_ids": chosen["prompt_ids"],
            "chosen": chosen["completion"], "chosen_ids": chosen["completion_ids"],
            "rejected": rejected["completion"], "rejected_ids": rejected["completion_ids"],
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
        })
    return pairs, stats


_STAT_FIELDS = list(PairStats().as_dict())
# Pairing output carries each prompt's counts on its first row (a prompt without pairs emits one row with a
# null pair_id), so one shuffle yields both the pairs and the statistics of what was dropped.
_PAIRING = schemas.PAIRS
for _name in _STAT_FIELDS:
    _PAIRING = _PAIRING.append(pa.field(f"stat_{_name}", pa.int64()))


def _pairs_with_stats(group: pa.Table, lab: LabelConfig) -> pa.Table:
    pairs, stats = _group_pairs(group, lab)
    if not pairs:
        pairs = [{name: None for name in schemas.PAIRS.names}]
    counts = stats.as_dict()
    for i, row in enumerate(pairs):
        row.update({f"stat_{k}": (v if i == 0 else 0) for k, v in counts.items()})
    return schemas.rows_to_table(pairs, _PAIRING)


def _as_scored(batch: pa.Table) -> pa.Table:
    """The batch's columns in SCORED's order; one that no labeler of this config gives (filter_reward without a
    filter, reference_token_logp without the implicit labeler) null."""
    return pa.Table.from_arrays([batch[f.name] if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type)
                                 for f in schemas.SCORED], names=schemas.SCORED.names)


def _no_messages(batch: pa.Table) -> pa.Table:
    return batch.add_column(batch.schema.get_field_index("prompt") + 1, schemas.COMPLETIONS.field("messages_json"),
                            pa.nulls(batch.num_rows, pa.string()))


def read_completions(cfg: PipelineConfig, path: Path) -> ray.data.Dataset:
    """The completions at `path`. Those an earlier version sampled have no messages_json, and its sample stage is
    reused as it is (the stage key did not change): they are read with the column null, which is exact for
    plain-text prompts without a system prompt; a reward model or judge then sees a chat prompt's last user turn
    alone, as that version showed it, and a warning says so."""
    ds = ray.data.read_parquet(str(path))
    if "messages_json" in schemas.column_names(path):
        return ds
    if {"reward_model", "judge"} & {cfg.label.labeler, cfg.label.filter_labeler}:
        log.warning(f"label: {path} was sampled by an earlier dpo-ray, which did not keep the prompts' "
                    "conversations (messages_json): the reward model or judge sees each prompt's last user turn "
                    "without the system prompt or earlier turns. Sample again (delete the sample folder) to label "
                    "whole conversations")
    return ds.map_batches(_no_messages, batch_format="pyarrow")


def label_completions(cfg: PipelineConfig, completions_path: Path, out: Path, sampled_by: str | None) -> dict:
    """Score completions and pair them; `sampled_by` names the model that sampled them, when the caller knows."""
    check_labeler(cfg, cfg.label.labeler)
    check_labeler(cfg, cfg.label.filter_labeler)
    scored = add_rewards(read_completions(cfg, completions_path), cfg, sampled_by=sampled_by)
    if cfg.label.filter_labeler:
        # Materialized first, so only one scorer's actor pool holds CPUs at a time: two pools in one streaming
        # pipeline can take the CPUs its read tasks need and wait on each other forever (seen on 2 CPUs).
        scored = add_rewards(scored.materialize(), cfg, cfg.label.filter_labeler, column="filter_reward")
    scored.map_batches(_as_scored, batch_format="pyarrow").write_parquet(str(out / "scored"))
    paired = (
        by_prompt(ray.data.read_parquet(str(out / "scored")))
        .map_groups(_pairs_with_stats, fn_args=(cfg.label,), batch_format="pyarrow")
        .materialize()
    )
    totals = sum_columns(paired, [f"stat_{name}" for name in _STAT_FIELDS])
    stats = {name: totals[f"stat_{name}"] for name in _STAT_FIELDS}
    if stats["pairs"] == 0:
        raise InputError(f"label: no preference pairs from {stats['completions']} completions "
                         f"({json.dumps(stats)}); sample more (sample.n, data.num_train_prompts) "
                         "or lower label.min_margin")
    pairs = paired.filter(expr=col("pair_id").is_not_null()).select_columns(schemas.PAIRS.names)
    pairs.write_parquet(str(out / "pairs"))
    return stats


def import_preferences(cfg: PipelineConfig, out: Path) -> dict:
    """Offline DPO: existing prompt/chosen/rejected data, tokenized as the policy's tokenizer sees it."""
    data = cfg.data
    read = read_preferences(data.preferences, data.on_bad_rows, split=data.split, columns=data.columns)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    rows, rejects, truncated_prompts, truncated_completions = [], list(read.rejects), 0, 0
    for rec in read.rows:
        field = "prompt"
        try:
            prompt_ids, cut = prompt_token_ids(tokenizer, rec["prompt"], rec["messages_json"], data.system_prompt,
                                               data.max_prompt_tokens, data.prompt_truncation)
            full = {}
            for field in ("chosen", "rejected"):
                full[field] = completion_token_ids(tokenizer, rec["prompt"], rec["messages_json"],
                                                   data.system_prompt, rec[field])
            sides = {side: ids[: data.max_completion_tokens] for side, ids in full.items()}
        except TokenizationError as err:
            if data.on_bad_rows == "error":
                raise TokenizationError(f"{data.preferences}: row {rec['row']}: field {field}: {err}") from None
            rejects.append(Reject(data.preferences, rec["row"], field, str(err), json.dumps(rec)))
            continue
        if sides["chosen"] == sides["rejected"]:
            problem = "chosen and rejected tokenize identically (after truncation)"
            if data.on_bad_rows == "error":
                raise TokenizationError(f"{data.preferences}: row {rec['row']}: field rejected: {problem}")
            rejects.append(Reject(data.preferences, rec["row"], "rejected", problem, json.dumps(rec)))
            continue
        truncated_prompts += cut
        truncated_completions += sum(len(ids) > data.max_completion_tokens for ids in full.values())
        rows.append({
            "pair_id": rec["id"], "prompt_id": rec["id"], "prompt": rec["prompt"], "prompt_ids": prompt_ids,
            "chosen": rec["chosen"], "chosen_ids": sides["chosen"],
            "rejected": rec["rejected"], "rejected_ids": sides["rejected"],
            "chosen_reward": None, "rejected_reward": None,
        })
    if not rows:
        raise InputError(f"label: no usable pairs in {data.preferences}: all {len(rejects)} rows were rejected "
                         "(data.on_bad_rows=error stops at the first, naming its row and field)")
    (out / "pairs").mkdir(parents=True)
    pq.write_table(schemas.rows_to_table(rows, schemas.PAIRS), out / "pairs" / "part-0.parquet")
    write_rejects(rejects, out)
    return {"pairs": len(rows), "rejected_rows": len(rejects), "prompts_truncated": truncated_prompts,
            "completions_truncated": truncated_completions}
