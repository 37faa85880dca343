"""The train stage's pair order: a seeded key per pair_id, so the batches do not depend on the Parquet layout."""

import pyarrow as pa

from dpo_ray.stages.train import epoch_layout, with_order_key


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


def test_every_pair_trains_each_epoch_the_last_batch_filled_by_repeats():
    assert epoch_layout(28, 4) == (7, 0)
    assert epoch_layout(29, 4) == (8, 3)  # drop_last would have trained 28 and never seen one pair
    assert epoch_layout(4, 4) == (1, 0)
