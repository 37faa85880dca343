"""Ray Data steps that the stages and operators share: grouping completions by prompt, statistics carried in
columns summed back in the driver, and the fixed batches of a model's actor pool."""

from __future__ import annotations

import pyarrow.compute as pc
import ray


def by_prompt(ds: ray.data.Dataset):
    """`ds` grouped by prompt_id, by the sort-based shuffle init_ray chooses: as many partitions as `ds` has blocks
    (the hash shuffle's default of 200 cost a minute of task overhead on a small node)."""
    return ds.groupby("prompt_id")


def sum_columns(ds: ray.data.Dataset, columns: list[str]) -> dict[str, int]:
    """The sum of each integer column, streamed through the driver one batch at a time: Ray's own `sum` would plan
    another shuffle, about 10 s of overhead for a handful of integers."""
    totals = dict.fromkeys(columns, 0)
    for batch in ds.select_columns(columns).iter_batches(batch_format="pyarrow"):
        for column in columns:
            totals[column] += pc.sum(batch[column]).as_py() or 0
    return totals


def map_model_batches(ds: ray.data.Dataset, fn, pool: dict, **kwargs) -> ray.data.Dataset:
    """`ds.map_batches(fn, **pool, **kwargs)` for a model's actor pool (scorers.scorer_pool, samplers.sampler_pool),
    over blocks of exactly the pool's batch_size rows, so each batch holds the same rows whatever blocks Ray Data
    read or produced upstream. A padded forward gives a row's sums other last bits beside other rows; batches that
    followed the blocks gave the same seeds other reference log-probs (up to 1.2e-4 nats), samples and trained
    weights from run to run (benchmarks/README.md)."""
    fixed = ds.repartition(target_num_rows_per_block=pool["batch_size"], strict=True)
    return fixed.map_batches(fn, **pool, **kwargs)
