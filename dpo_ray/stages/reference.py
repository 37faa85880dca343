"""reference: one offline pass scoring every pair under the reference model, so training never holds one.

Writes `schemas.REFERENCE`: the pairs plus `ref_chosen_logps` and `ref_rejected_logps`, each the reference model's
log-prob summed over completion tokens only, computed by the scorer of `ops/scorers.py` (the training forward
code). With `reference.cache`, sequences the reference cache already holds are not scored again, and what this
pass scored new is added to it.
"""

from __future__ import annotations

import hashlib
import math

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from dpo_ray import keys
from dpo_ray.config import PipelineConfig
from dpo_ray.models import model_fingerprint
from dpo_ray.ops.scorers import ReferenceCache, score_logps, sequence_key
from dpo_ray.runner import StageContext

SOURCES = {"pairs": True}
# Token-id column of each side of a pair -> its reference log-prob column.
_SIDES = {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    return {"pairs": digests["pairs"], "reference": model_fingerprint(cfg.reference_model), "dtype": cfg.model.dtype,
            "limits": keys.limits(cfg)}


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    cache = ReferenceCache.of(cfg) if cfg.reference.cache else None
    known = cache.load() if cache else {}
    pairs = ray.data.read_parquet(str(ctx.sources["pairs"]))
    scored = score_logps(pairs, cfg, cfg.reference_model, _SIDES, cache)
    scored.write_parquet(str(ctx.out))
    # Streamed back one row group at a time: the statistics, and the sequences the cache does not have yet.
    stats = {"pairs": 0, "nonfinite_pairs": 0, "pairs_from_cache": 0}
    fresh: dict[bytes, float] = {}
    for path in sorted(ctx.out.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["prompt_ids", *_SIDES, *_SIDES.values()]):
            stats["pairs"] += batch.num_rows
            finite = pc.and_(pc.is_finite(batch["ref_chosen_logps"]), pc.is_finite(batch["ref_rejected_logps"]))
            stats["nonfinite_pairs"] += batch.num_rows - (pc.sum(finite).as_py() or 0)
            if cache is None:
                continue
            columns = batch.to_pydict()
            for r, prompt in enumerate(columns["prompt_ids"]):
                sequences = [sequence_key(prompt, columns[side][r]) for side in _SIDES]
                stats["pairs_from_cache"] += all(k in known for k in sequences)
                for key, out in zip(sequences, _SIDES.values()):
                    if key not in known and math.isfinite(columns[out][r]):
                        fresh[key] = columns[out][r]
    if fresh:
        cache.add(list(fresh), list(fresh.values()), hashlib.sha1(b"".join(fresh)).hexdigest()[:16])
    return stats
