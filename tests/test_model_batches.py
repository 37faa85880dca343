"""A model's actor pool sees the same batches whatever blocks Ray Data read its input in: a padded forward gives a
row other last bits beside other rows, so batches that followed the blocks gave the same seeds other log-probs."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from dpo_ray.config import load_config
from dpo_ray.ops.scorers import score_logps

pytestmark = pytest.mark.slow
SIDES = {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}


def test_reference_logps_do_not_depend_on_the_reads_blocks(ray_local, tmp_path):
    rng = random.Random(0)
    ids = lambda low, high: [rng.randrange(100, 5000) for _ in range(rng.randint(low, high))]  # noqa: E731
    rows = [{"pair_id": f"p{i:02d}", "prompt_ids": ids(3, 30), "chosen_ids": ids(2, 30), "rejected_ids": ids(2, 30)}
            for i in range(48)]
    for part in range(6):
        pq.write_table(pa.Table.from_pylist(rows[8 * part : 8 * part + 8]), tmp_path / f"part-{part}.parquet")
    cfg = load_config("configs/tiny.yaml", ["reference.batch_size=4"])
    scored = {}
    for blocks in (1, 6):
        ds = ray.data.read_parquet(str(tmp_path), override_num_blocks=blocks)
        scored[blocks] = {r["pair_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"])
                          for r in score_logps(ds, cfg, "builtin:tiny-llama", SIDES).take_all()}
    assert len(scored[1]) == 48
    assert scored[1] == scored[6]  # to the last bit
