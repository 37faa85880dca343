"""reference: one offline pass scoring every pair under the reference model, so training never holds one.

Writes `schemas.REFERENCE`: the pairs plus `ref_chosen_logps` and `ref_rejected_logps`, each the reference
model's log-prob summed over completion tokens only. The scorer below is the same code path training uses
(`logprobs.completion_logps`); the label and evaluate stages reuse it to score completions under any model.

A fixed reference is never asked twice about the same sequence: every (prompt_ids, completion_ids) the stage scores
is kept in a cache under the run root, keyed by its token ids and the reference model's fingerprint, so a later
round, a relabeled rerun or another run sharing the reference only scores pairs it has not seen.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.logprobs import shared_prompt_batch, shared_prompt_logps
from dpo_ray.models import device_for, load_causal_lm, load_tokenizer, model_fingerprint, set_torch_threads
from dpo_ray.stages.sample import sample_logp_is_exact


# Token-id column of each side of a pair -> its reference log-prob column.
_SIDES = {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}


def _find_malloc_trim():
    """glibc's malloc_trim, or None on a C library without it (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


def sequence_key(prompt_ids, completion_ids) -> bytes:
    """16 bytes naming one scored sequence: its prompt and completion token ids."""
    h = hashlib.blake2b(np.asarray(prompt_ids, np.int32).tobytes(), digest_size=16)
    h.update(b"|")
    h.update(np.asarray(completion_ids, np.int32).tobytes())
    return h.digest()


class ReferenceCache:
    """Summed log-probs one reference model already gave, by sequence_key: `<run.root>/reference_cache/
    <model fingerprint>-<dtype>/`, one Parquet file (schemas.REFERENCE_CACHE) per stage run that scored something
    new, renamed into place complete."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "ReferenceCache":
        name = f"{model_fingerprint(cfg.reference_model)}-{cfg.model.dtype}"
        return cls(Path(cfg.run.root).resolve() / "reference_cache" / name)

    def load(self) -> dict[bytes, float]:
        known: dict[bytes, float] = {}
        for path in sorted(self.folder.glob("*.parquet")):
            table = schemas.read_table(path, schemas.REFERENCE_CACHE)
            known.update(zip(table["sequence_key"].to_pylist(), table["logp"].to_pylist()))
        return known

    def add(self, keys: list[bytes], logps: list[float], name: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.parquet.tmp"
        pq.write_table(schemas.to_table({"sequence_key": keys, "logp": logps}, schemas.REFERENCE_CACHE), tmp)
        os.replace(tmp, self.folder / f"{name}.parquet")


class LogProbScorer:
    """Ray Data callable: appends, for each (token-id column -> output column), the summed completion log-prob
    of `prompt_ids` + that column under one model. A row's completions share one prompt forward (its KV cache);
    rows are length-sorted into forward batches to cut padding. With a `cache_dir` (a ReferenceCache of this
    model), rows whose every sequence is cached take the cached values and are not run through the model."""

    def __init__(self, cfg: dict, model_spec: str, columns: dict[str, str], cache_dir: str | None = None):
        self.cfg = PipelineConfig.model_validate(cfg)
        set_torch_threads(self.cfg.run.torch_threads)
        self.columns = columns
        self.device = device_for(ray.get_gpu_ids())
        self.model = load_causal_lm(model_spec, self.cfg.model.dtype, self.device,
                                    self.cfg.model.trust_remote_code).eval()
        self.pad_id = load_tokenizer(model_spec, self.cfg.model.trust_remote_code).pad_token_id
        self.known = ReferenceCache(Path(cache_dir)).load() if cache_dir else {}

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch["prompt_ids"].to_pylist()
        completions = list(zip(*(batch[col].to_pylist() for col in self.columns)))
        results = [[math.nan] * len(self.columns) for _ in range(batch.num_rows)]
        todo = []
        for r in range(batch.num_rows):
            cached = [self.known.get(sequence_key(prompts[r], c)) for c in completions[r]] if self.known else [None]
            if None in cached:
                todo.append(r)
            else:
                results[r] = cached
        order = sorted(todo, key=lambda r: len(prompts[r]) + max(map(len, completions[r])))
        size = self.cfg.reference.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            tensors = shared_prompt_batch([prompts[r] for r in rows], [completions[r] for r in rows], self.pad_id)
            sums, _ = shared_prompt_logps(self.model, **{k: t.to(self.device) for k, t in tensors.items()})
            for i, r in enumerate(rows):
                results[r] = sums[i * len(self.columns) : (i + 1) * len(self.columns)].tolist()
        for index, out in enumerate(self.columns.values()):
            batch = batch.append_column(out, pa.array([r[index] for r in results], pa.float64()))
        # glibc raises its mmap threshold to each large block freed (up to 32 MiB), so a forward's logits chunks
        # then come from the heap and some stay resident: in the actor, memory moved in ~30 MiB steps and its peak
        # grew with the number of batches (benchmarks/README.md, figure 4). Returning the free heap after each
        # batch levels it at no measured cost; a fixed low threshold also did, but cost 10-28% in speed.
        if _malloc_trim is not None:
            _malloc_trim(0)
        return batch


def score_logps(ds: ray.data.Dataset, cfg: PipelineConfig, model_spec: str, columns: dict[str, str],
                cache: ReferenceCache | None = None) -> ray.data.Dataset:
    r = cfg.reference
    return ds.map_batches(
        LogProbScorer,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "model_spec": model_spec, "columns": columns,
                               "cache_dir": str(cache.folder) if cache else None},
        batch_size=max(r.batch_size * 4, 16),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=r.num_actors),
        **r.actor_resources(),
    )


def completion_logps_column(ds: ray.data.Dataset, cfg: PipelineConfig, model_spec: str, column: str,
                            sampled_by: str | None = None) -> ray.data.Dataset:
    """`ds` with `column` = model_spec's summed log-prob of each row's completion_ids. When model_spec sampled
    the rows (`sampled_by`) and the sampler's log-prob is exact, it is taken from sample_logp, not recomputed."""
    if sampled_by == model_spec and sample_logp_is_exact(cfg):
        return ds.map_batches(lambda b: b.append_column(column, b["sample_logp"]), batch_format="pyarrow")
    return score_logps(ds, cfg, model_spec, {"completion_ids": column}).materialize()


def run(cfg: PipelineConfig, pairs_path: str, out_dir: str) -> dict:
    cache = ReferenceCache.of(cfg) if cfg.reference.cache else None
    known = cache.load() if cache else {}
    pairs = ray.data.read_parquet(pairs_path)
    scored = score_logps(pairs, cfg, cfg.reference_model, _SIDES, cache)
    scored.write_parquet(out_dir)
    # Streamed back one row group at a time: the statistics, and the sequences the cache does not have yet.
    stats = {"pairs": 0, "nonfinite_pairs": 0, "pairs_from_cache": 0}
    fresh: dict[bytes, float] = {}
    for path in sorted(Path(out_dir).glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["prompt_ids", *_SIDES, *_SIDES.values()]):
            stats["pairs"] += batch.num_rows
            finite = pc.and_(pc.is_finite(batch["ref_chosen_logps"]), pc.is_finite(batch["ref_rejected_logps"]))
            stats["nonfinite_pairs"] += batch.num_rows - (pc.sum(finite).as_py() or 0)
            if cache is None:
                continue
            columns = batch.to_pydict()
            for r, prompt in enumerate(columns["prompt_ids"]):
                keys = [sequence_key(prompt, columns[side][r]) for side in _SIDES]
                stats["pairs_from_cache"] += all(k in known for k in keys)
                for key, out in zip(keys, _SIDES.values()):
                    if key not in known and math.isfinite(columns[out][r]):
                        fresh[key] = columns[out][r]
    if fresh:
        cache.add(list(fresh), list(fresh.values()), hashlib.sha1(b"".join(fresh)).hexdigest()[:16])
    return stats


def main(argv: list[str] | None = None) -> None:
    from dpo_ray.cli import stage_entry

    stage_entry("reference", argv)


if __name__ == "__main__":
    main()
