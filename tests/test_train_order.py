"""The train stage's pair order: a seeded key per pair_id, so the batches do not depend on the Parquet layout."""

import pyarrow as pa

from dpo_ray.stages.train import with_order_key


def _order(ids: list[str], seed: int) -> list[str]:
    keyed = with_order_key(pa.table({"pair_id": ids}), seed)
    return keyed.sort_by("_order")["pair_id"].to_pylist()


def test_order_depends_on_the_pairs_and_seed_not_on_row_positions():
    ids = [f"movie-{i:04d}:0>1" for i in range(50)]
    assert _order(ids, seed=0) == _order(list(reversed(ids)), seed=0) == _order(ids[25:] + ids[:25], seed=0)


def test_another_seed_gives_another_order_and_none_is_the_input_order():
    ids = [f"movie-{i:04d}:0>1" for i in range(50)]
    assert _order(ids, seed=0) != _order(ids, seed=1)
    assert _order(ids, seed=0) != ids
