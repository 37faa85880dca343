"""Summed completion log-probs of token sequences under a model, and the reference cache.

The scorer runs the same forward code as training (`logprobs.shared_prompt_logps`): the reference stage scores
pairs with it, the label and evaluate stages score completions under any model.

A fixed reference is never asked twice about the same sequence: every (prompt_ids, completion_ids) the reference
stage scores is kept in a `ReferenceCache` under the run root, keyed by its token ids and the reference model's
fingerprint, dtype and quantization (QLoRA's 4-bit reference, train.lora.quantize), so a later round, a relabeled
rerun or another run sharing the reference only scores pairs it has not seen.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.logprobs import shared_prompt_batch, shared_prompt_logps
from dpo_ray.models import ModelSpec, device_for, model_fingerprint, set_torch_threads
from dpo_ray.ops.samplers import sample_logp_is_exact


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
    """Log-probs of sequences already scored by one reference model (fingerprint and dtype name the folder).
    Each reference stage adds one Parquet file of what it scored new, renamed into place complete."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "ReferenceCache":
        name = f"{model_fingerprint(cfg.reference_model)}-{cfg.model.dtype}"
        if cfg.reference_quantize:
            # The 4-bit reference is another model: its log-probs never mix with the full-precision one's.
            name += f"-{cfg.reference_quantize}"
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


@dataclass(frozen=True)
class ScorerSpec:
    """What a scorer actor reads: the model, which token-id column goes to which log-prob column, the forward
    batch size and the reference cache to take known sequences from (None: score every row)."""

    model: ModelSpec
    columns: dict[str, str]
    batch_size: int
    cache_dir: str | None = None

    @classmethod
    def of(cls, cfg: PipelineConfig, model: str, columns: dict[str, str],
           cache: ReferenceCache | None = None, quantize: str | None = None) -> "ScorerSpec":
        return cls(ModelSpec.of(cfg, model, quantize), columns, cfg.reference.batch_size,
                   str(cache.folder) if cache else None)


class LogProbScorer:
    """Ray Data callable: appends, for each (token-id column -> output column), the summed completion log-prob
    of `prompt_ids` + that column under one model. A row's completions share one prompt forward (its KV cache);
    rows are length-sorted into forward batches to cut padding. Rows whose every sequence is in the spec's cache
    take the cached values and are not run through the model."""

    def __init__(self, spec: ScorerSpec):
        set_torch_threads(spec.model.torch_threads)
        self.spec = spec
        self.device = device_for(ray.get_gpu_ids())
        self.model = spec.model.load_causal_lm(self.device).eval()
        self.pad_id = spec.model.load_tokenizer().pad_token_id
        self.known = ReferenceCache(Path(spec.cache_dir)).load() if spec.cache_dir else {}

    def _uncached_rows(self, prompts: list, completions: list, results: list) -> list[int]:
        """Rows to run through the model; the others get their cached values in `results`."""
        todo = []
        for r, prompt in enumerate(prompts):
            cached = [self.known.get(sequence_key(prompt, c)) for c in completions[r]] if self.known else [None]
            if None in cached:
                todo.append(r)
            else:
                results[r] = cached
        return todo

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = self.spec.columns
        prompts = batch["prompt_ids"].to_pylist()
        completions = list(zip(*(batch[col].to_pylist() for col in columns)))
        results = [[math.nan] * len(columns) for _ in range(batch.num_rows)]
        todo = self._uncached_rows(prompts, completions, results)
        order = sorted(todo, key=lambda r: len(prompts[r]) + max(map(len, completions[r])))
        size = self.spec.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            tensors = shared_prompt_batch([prompts[r] for r in rows], [completions[r] for r in rows], self.pad_id)
            sums, _ = shared_prompt_logps(self.model, **{k: t.to(self.device) for k, t in tensors.items()})
            for i, r in enumerate(rows):
                results[r] = sums[i * len(columns) : (i + 1) * len(columns)].tolist()
        for index, out in enumerate(columns.values()):
            batch = batch.append_column(out, pa.array([r[index] for r in results], pa.float64()))
        # glibc raises its mmap threshold to each large block freed (up to 32 MiB), so a forward's logits chunks
        # then come from the heap and some stay resident: in the actor, memory moved in ~30 MiB steps and its peak
        # grew with the number of batches (benchmarks/README.md, figure 4). Returning the free heap after each
        # batch levels it at no measured cost; a fixed low threshold also did, but cost 10-28% in speed.
        if _malloc_trim is not None:
            _malloc_trim(0)
        return batch


def score_logps(ds: ray.data.Dataset, cfg: PipelineConfig, model: str, columns: dict[str, str],
                cache: ReferenceCache | None = None, quantize: str | None = None) -> ray.data.Dataset:
    r = cfg.reference
    return ds.map_batches(
        LogProbScorer,
        fn_constructor_kwargs={"spec": ScorerSpec.of(cfg, model, columns, cache, quantize)},
        batch_size=max(r.batch_size * 4, 16),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=r.num_actors),
        **r.actor_resources(),
    )


def completion_logps_column(ds: ray.data.Dataset, cfg: PipelineConfig, model: str, column: str,
                            sampled_by: str | None = None) -> ray.data.Dataset:
    """`ds` with `column` = model's summed log-prob of each row's completion_ids, lazily (a scorer pool starts
    when the dataset runs). When `model` sampled the rows (`sampled_by`) and the sampler's log-prob is exact, it is
    taken from sample_logp, not recomputed."""
    if sampled_by == model and sample_logp_is_exact(cfg):
        return ds.map_batches(lambda b: b.append_column(column, b["sample_logp"]), batch_format="pyarrow")
    return score_logps(ds, cfg, model, {"completion_ids": column})
