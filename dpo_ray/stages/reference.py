"""reference: one offline pass scoring every pair under the reference model, so training never holds one.

Writes `schemas.REFERENCE`: the pairs plus `ref_chosen_logps` and `ref_rejected_logps`, each the reference model's
log-prob summed over completion tokens only, computed by the scorer of `ops/scorers.py` (the training forward
code). With `reference.cache`, sequences the reference cache already holds are not scored again, and what this
pass scored new is added to it. With `replay` sources (earlier rounds' pairs) and `reference.replay_share`, a
seeded draw of earlier pairs joins the new ones; under an unchanged reference their log-probs come from the cache.
"""

from __future__ import annotations

import hashlib
import math
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from dpo_ray import keys, schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.models import model_fingerprint
from dpo_ray.ops.scorers import ReferenceCache, score_logps, sequence_key
from dpo_ray.pairs import replay_choice, replay_count
from dpo_ray.runner import MANY, StageContext

# `replay`: earlier rounds' pair folders, drawn from for reference.replay_share of the pairs (rounds pass them all).
SOURCES = {"pairs": True, "replay": MANY}
# Token-id column of each side of a pair -> its reference log-prob column.
_SIDES = {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    key = {"pairs": digests["pairs"], "reference": model_fingerprint(cfg.reference_model), "dtype": cfg.model.dtype,
           "limits": keys.limits(cfg)}
    if cfg.reference_quantize:  # left out when unset: reference keys made before it existed stay as they were
        key["quantize"] = cfg.reference_quantize
    if "replay" in digests and cfg.reference.replay_share > 0:
        key["replay"] = {"pairs": digests["replay"], "share": cfg.reference.replay_share, "seed": cfg.run.seed}
    return key


def _replayed(cfg: PipelineConfig, folders: list[Path], new_pairs: int) -> tuple[pa.Table | None, dict]:
    """reference.replay_share of the output drawn from the earlier pairs in `folders` (seeded by run.seed); their
    pair ids get the prefix `replay<i>/` (i: the folder's position), since rounds reuse prompt ids."""
    if not folders or cfg.reference.replay_share == 0:
        return None, {}
    tables = []
    for i, folder in enumerate(folders, 1):
        table = schemas.read_table(folder, schemas.PAIRS)
        ids = pc.binary_join_element_wise(f"replay{i}", table["pair_id"], "/")
        tables.append(table.set_column(table.schema.get_field_index("pair_id"), "pair_id", ids))
    pool = pa.concat_tables(tables)
    count = replay_count(new_pairs, pool.num_rows, cfg.reference.replay_share)
    stats = {"replayed_pairs": count, "replay_pool": pool.num_rows}
    if count == 0:  # a round with a single new pair at share 0.25, say
        return None, stats
    return pool.take(replay_choice(pool["pair_id"].to_pylist(), count, cfg.run.seed)), stats


def _side_keys(batch: pa.RecordBatch | pa.Table) -> list[tuple[bytes, ...]]:
    """Each pair's sequence keys, one per side of _SIDES."""
    columns = batch.select(["prompt_ids", *_SIDES]).to_pydict()
    return [tuple(sequence_key(prompt, columns[side][r]) for side in _SIDES)
            for r, prompt in enumerate(columns["prompt_ids"])]


def _known(cache: ReferenceCache, pairs: Path, replayed: pa.Table | None) -> pa.Table:
    """What the cache holds of these pairs' sequences; the pairs are streamed a batch at a time."""
    batches = chain(schemas.iter_batches(pairs, ["prompt_ids", *_SIDES]), replayed.to_batches() if replayed else ())
    return cache.lookup(key for batch in batches for keys in _side_keys(batch) for key in keys)


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    pairs = ray.data.read_parquet(str(ctx.sources["pairs"]))
    replayed, stats = _replayed(cfg, ctx.sources.get("replay", []), pairs.count())
    if replayed is not None:
        pairs = pairs.union(ray.data.from_arrow(replayed))
    cache = ReferenceCache.of(cfg) if cfg.reference.cache else None
    known = _known(cache, ctx.sources["pairs"], replayed) if cache else None
    scored = score_logps(pairs, cfg, cfg.reference_model, _SIDES, known, cfg.reference_quantize)
    scored.write_parquet(str(ctx.out))
    # Streamed back one row group at a time: the statistics, and the sequences the cache does not have yet.
    stats.update({"pairs": 0, "nonfinite_pairs": 0, "pairs_from_cache": 0})
    cached = set(known["sequence_key"].to_pylist()) if cache else set()
    fresh: dict[bytes, float] = {}
    for batch in schemas.iter_batches(ctx.out, ["prompt_ids", *_SIDES, *_SIDES.values()]):
        stats["pairs"] += batch.num_rows
        finite = pc.and_(pc.is_finite(batch["ref_chosen_logps"]), pc.is_finite(batch["ref_rejected_logps"]))
        stats["nonfinite_pairs"] += batch.num_rows - (pc.sum(finite).as_py() or 0)
        if cache is None:
            continue
        logps = batch.select(list(_SIDES.values())).to_pydict()
        for r, sequences in enumerate(_side_keys(batch)):
            stats["pairs_from_cache"] += all(k in cached for k in sequences)
            for key, out in zip(sequences, _SIDES.values()):
                if key not in cached and math.isfinite(logps[out][r]):
                    fresh[key] = logps[out][r]
    if fresh:
        cache.add(list(fresh), list(fresh.values()), hashlib.sha1(b"".join(fresh)).hexdigest()[:16])
    return stats
