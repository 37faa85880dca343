"""Summed completion log-probs of token sequences under a model, and the reference cache.

The scorer runs the same forward code as training (`logprobs.shared_prompt_logps`): the reference stage scores
pairs with it, the label and evaluate stages score completions under any model.

A fixed reference is never asked twice about the same sequence: every (prompt_ids, completion_ids) the reference
stage scores is kept in a `ReferenceCache` under the run root, keyed by its token ids and the reference model's
fingerprint, dtype and quantization (QLoRA's 4-bit reference, train.lora.quantize), so a later round, a relabeled
rerun or another run sharing the reference only scores pairs it has not seen. The stage looks up only its own
sequences (`ReferenceCache.lookup`, streaming the cache files) and hands the matches to its scorer actors, so no
process holds the whole cache, however many runs and rounds have added to it.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from dpo_ray import artifacts, schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.logprobs import precision, shared_prompt_batch, shared_prompt_logps
from dpo_ray.models import ModelSpec, device_for, inference_dtype, model_fingerprint, set_torch_threads
from dpo_ray.ops.datasets import map_model_batches
from dpo_ray.ops.samplers import SamplerSpec, TransformersSampler, sample_dataset, sample_logp_is_exact, sampler_pool


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

    def lookup(self, keys: Iterable[bytes]) -> pa.Table:
        """The cached rows (`schemas.REFERENCE_CACHE`) of `keys`. The files are read a batch at a time and only
        matches are kept, so memory follows `keys` (one stage's sequences), not everything ever scored under the
        run root (benchmarks/reference_cache.py). `keys` is not drawn from while the cache is empty."""
        files = sorted(self.folder.glob("*.parquet"))
        wanted = pa.array(set(keys) if files else (), pa.binary(16))
        found = []
        for path in files if len(wanted) else ():
            parquet = pq.ParquetFile(path)
            schemas.check_schema(parquet.schema_arrow, schemas.REFERENCE_CACHE, path)
            for batch in parquet.iter_batches(columns=schemas.REFERENCE_CACHE.names):
                found.append(batch.filter(pc.is_in(batch["sequence_key"], value_set=wanted)))
        return pa.Table.from_batches(found, schemas.REFERENCE_CACHE)

    def add(self, keys: list[bytes], logps: list[float], name: str) -> None:
        artifacts.write_parquet_atomic(schemas.to_table({"sequence_key": keys, "logp": logps},
                                                        schemas.REFERENCE_CACHE), self.folder / f"{name}.parquet")


@dataclass(frozen=True)
class ScorerSpec:
    """What a scorer actor reads: the model, which token-id column goes to which log-prob column, the forward
    batch size and the log-probs already known of some sequences (`ReferenceCache.lookup`; None: none)."""

    model: ModelSpec
    columns: dict[str, str]
    batch_size: int
    known: pa.Table | None = None

    @classmethod
    def of(cls, cfg: PipelineConfig, model: str, columns: dict[str, str], known: pa.Table | None = None,
           quantize: str | None = None, reference_pass: bool = False) -> "ScorerSpec":
        """`reference_pass`: the log-probs training compares with, in model.dtype; any other scorer runs in its
        inference dtype (models.inference_dtype)."""
        spec = ModelSpec.of(cfg, model, quantize)
        if not reference_pass:
            spec = replace(spec, dtype=inference_dtype(spec.dtype))
        return cls(spec, columns, cfg.reference.batch_size, known)


class LogProbScorer:
    """Ray Data callable: appends, for each (token-id column -> output column), the summed completion log-prob
    of `prompt_ids` + that column under one model. A row's completions share one prompt forward (its KV cache);
    rows are length-sorted into forward batches to cut padding. Rows whose every sequence the spec knows take the
    known values and are not run through the model."""

    def __init__(self, spec: ScorerSpec, loaded: dict | None = None):
        set_torch_threads(spec.model.torch_threads)
        self.spec = spec
        self.device = device_for(ray.get_gpu_ids())
        self.model = spec.model.load_eval(self.device, loaded)
        self.pad_id = spec.model.load_tokenizer().pad_token_id
        known = spec.known if spec.known is not None else schemas.REFERENCE_CACHE.empty_table()
        self.known = dict(zip(known["sequence_key"].to_pylist(), known["logp"].to_pylist()))

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
            with precision(self.spec.model.dtype, self.device):
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
                known: pa.Table | None = None, quantize: str | None = None) -> ray.data.Dataset:
    spec = ScorerSpec.of(cfg, model, columns, known, quantize, reference_pass=True)
    return map_model_batches(ds, LogProbScorer, scorer_pool(cfg), fn_constructor_kwargs={"spec": spec})


class SampleAndScore:
    """Ray Data callable: a transformers sampler (or none) and scorers in one actor, each batch through them in turn.
    Every actor pool costs a process start and a round of torch and transformers imports (6-7 s on two cores), so
    where a stage needs log-probs under several models (cfg.models_share_actor) one actor holds them all, each once
    (`loaded`: the models of the actor, shared with other SampleAndScore steps in it)."""

    def __init__(self, sampler: SamplerSpec | None, scorers: tuple[ScorerSpec, ...], loaded: dict | None = None):
        loaded = {} if loaded is None else loaded
        self.steps = [*([TransformersSampler(sampler, loaded)] if sampler else []),
                      *(LogProbScorer(spec, loaded) for spec in scorers)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for step in self.steps:
            batch = step(batch)
        return batch


class SampleEachAndScore:
    """Ray Data callable: prompt rows, each naming in its `model` column which of `samplers` samples it, in; that
    sampler's completion rows out, `model` kept, with the log-prob `columns` (their order) filled by the sampler
    (`exact`) or scored. One actor holds every model once, so the models' samples need one actor pool, not one each."""

    def __init__(self, samplers: dict[str, SamplerSpec], scorers: dict[str, tuple[ScorerSpec, ...]],
                 exact: dict[str, list[str]], columns: list[str]):
        loaded = {}
        self.sides = {name: SampleAndScore(spec, scorers[name], loaded) for name, spec in samplers.items()}
        self.exact, self.columns = exact, columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for name, steps in self.sides.items():
            rows = batch.filter(pc.equal(batch["model"], name))
            if rows.num_rows:
                parts.append(_as_side(_append_sample_logp(steps(rows), self.exact[name]), name, self.columns))
        if not parts:
            return pa.schema([*schemas.COMPLETIONS, *(pa.field(c, pa.float64()) for c in self.columns),
                              pa.field("model", pa.string())]).empty_table()
        return pa.concat_tables(parts)


def _named(batch: pa.Table, name: str) -> pa.Table:
    return batch.append_column("model", pa.array([name] * batch.num_rows, pa.string()))


def _as_side(batch: pa.Table, name: str, columns: list[str]) -> pa.Table:
    """Completion rows of the model named `name`: that name in a `model` column, and the columns in one order for all
    models' rows."""
    return _named(batch, name).select([*schemas.COMPLETIONS.names, *columns, "model"])


LogpColumns = Sequence[tuple[str, str]]  # (model, column of its summed log-prob of completion_ids)


def _append_sample_logp(batch: pa.Table, columns: list[str]) -> pa.Table:
    for column in columns:
        batch = batch.append_column(column, batch["sample_logp"])
    return batch


def _split(cfg: PipelineConfig, columns: LogpColumns, sampled_by: str | None) -> tuple[list[str], tuple]:
    """The columns the sampler's log-prob gives exactly (those of the model that sampled the rows, where
    sample_logp_is_exact), and the scorer specs of the others."""
    exact = [column for model, column in columns if model == sampled_by and sample_logp_is_exact(cfg)]
    return exact, tuple(ScorerSpec.of(cfg, model, {"completion_ids": column}) for model, column in columns
                        if column not in exact)


def _with_sample_logp(ds: ray.data.Dataset, columns: list[str]) -> ray.data.Dataset:
    if not columns:
        return ds
    return ds.map_batches(_append_sample_logp, fn_kwargs={"columns": columns}, batch_format="pyarrow")


def scorer_pool(cfg: PipelineConfig, model_batch: int | None = None) -> dict:
    """map_batches arguments of a pool of scoring actors (reference.num_actors, each with reference's resources),
    fed four of its model batches (`model_batch` rows, reference.batch_size unless given) at a time."""
    r = cfg.reference
    return {"batch_size": max((model_batch or r.batch_size) * 4, 16), "batch_format": "pyarrow",
            "compute": ray.data.ActorPoolStrategy(size=r.num_actors), **r.actor_resources()}


def completion_logps_columns(ds: ray.data.Dataset, cfg: PipelineConfig, columns: LogpColumns,
                             sampled_by: str | None = None) -> ray.data.Dataset:
    """`ds` with, for each (model, column), that model's summed log-prob of every row's completion_ids, lazily.
    Where `model` sampled the rows (`sampled_by`) and the sampler's log-prob is exact it is taken from sample_logp;
    the others are scored in one actor pool holding every model (cfg.models_share_actor), or in one pool per model,
    each but the last materialized so that one model's pool runs at a time."""
    exact, scorers = _split(cfg, columns, sampled_by)
    ds = _with_sample_logp(ds, exact)
    if cfg.models_share_actor and scorers:
        return map_model_batches(ds, SampleAndScore, scorer_pool(cfg),
                                 fn_constructor_kwargs={"sampler": None, "scorers": scorers})
    for index, spec in enumerate(scorers):
        ds = map_model_batches(ds.materialize() if index else ds, LogProbScorer, scorer_pool(cfg),
                               fn_constructor_kwargs={"spec": spec})
    return ds


def each_sampled_with_logps(prompts: ray.data.Dataset, cfg: PipelineConfig, samplers: dict[str, str], n: int,
                            max_new_tokens: int, temperature: float, seed: int,
                            columns: LogpColumns) -> ray.data.Dataset:
    """For each (name, model) of `samplers`, `model`'s completions of `prompts` with `name` in a `model` column, each
    with `columns` (completion_logps_columns), materialized. Where models share an actor and the sampler is
    transformers', all in one actor pool; otherwise each model's as sampled_with_logps, one after the other."""
    names = [column for _, column in columns]
    if not cfg.models_share_actor or cfg.sample.backend != "transformers":
        sides = [sampled_with_logps(prompts, cfg, model, n, max_new_tokens, temperature, seed, columns).map_batches(
            _as_side, fn_args=(name, names), batch_format="pyarrow").materialize() for name, model in samplers.items()]
        return _one_after_another(sides).materialize()
    # Each model's prompts after the other's, materialized: a batch then mostly holds one model's prompts, generated
    # as wide as sample.batch_size as in a pool per model, and no read task waits upstream of the pool. One model's
    # prompts stream into the pool from their read, as sampled_with_logps' do.
    sides = [prompts.map_batches(_named, fn_args=(name,), batch_format="pyarrow") for name in samplers]
    named = _one_after_another(sides).materialize() if len(sides) > 1 else sides[0]
    return map_model_batches(
        named, SampleEachAndScore, sampler_pool(cfg),
        fn_constructor_kwargs=sample_each_args(cfg, samplers, n, max_new_tokens, temperature, seed, columns)
    ).materialize()


def _one_after_another(datasets: list[ray.data.Dataset]) -> ray.data.Dataset:
    # Ray Data's union refuses a single dataset.
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def sample_each_args(cfg: PipelineConfig, samplers: dict[str, str], n: int, max_new_tokens: int, temperature: float,
                     seed: int, columns: LogpColumns) -> dict:
    """SampleEachAndScore's arguments: each of `samplers` sampling and the other models of `columns` scoring."""
    split = {name: _split(cfg, columns, model) for name, model in samplers.items()}
    return {"samplers": {name: SamplerSpec.of(cfg, model, n, max_new_tokens, temperature, seed)
                         for name, model in samplers.items()},
            "scorers": {name: scorers for name, (_, scorers) in split.items()},
            "exact": {name: exact for name, (exact, _) in split.items()}, "columns": [column for _, column in columns]}


def sampled_with_logps(prompts: ray.data.Dataset, cfg: PipelineConfig, model: str, n: int, max_new_tokens: int,
                       temperature: float, seed: int, columns: LogpColumns) -> ray.data.Dataset:
    """`model`'s completions of `prompts` (samplers.sample_dataset) with `columns` (completion_logps_columns),
    lazily: sampled and scored in one actor pool (the sampler's) where models share an actor and the sampler is
    transformers'. Otherwise the samples are materialized before any scorer: a sampler actor and a scorer actor
    streaming into each other hold a two-core node's CPUs while the prompts' read task waits for one, and the stage
    hangs."""
    if not cfg.models_share_actor or cfg.sample.backend != "transformers":
        samples = sample_dataset(prompts, cfg, model, n, max_new_tokens, temperature, seed).materialize()
        return completion_logps_columns(samples, cfg, columns, sampled_by=model)
    exact, scorers = _split(cfg, columns, model)
    sampler = SamplerSpec.of(cfg, model, n, max_new_tokens, temperature, seed)
    return _with_sample_logp(map_model_batches(prompts, SampleAndScore, sampler_pool(cfg),
                                               fn_constructor_kwargs={"sampler": sampler, "scorers": scorers}),
                             exact)
