"""The reference stage's sequence cache: keys, storage, and the scorer skipping rows it already knows."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray import schemas
from dpo_ray.schemas import SchemaError
from dpo_ray.config import load_config
from dpo_ray.ops.scorers import LogProbScorer, ReferenceCache, ScorerSpec, sequence_key

SIDES = {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}


def test_sequence_key_separates_prompt_from_completion():
    assert sequence_key([1, 2], [3]) != sequence_key([1], [2, 3])
    assert sequence_key([1, 2], [3]) == sequence_key([1, 2], [3]) and len(sequence_key([1], [2])) == 16


def _as_dict(table):
    return dict(zip(table["sequence_key"].to_pylist(), table["logp"].to_pylist()))


def test_cache_round_trip_and_files_appear_complete(tmp_path):
    cache = ReferenceCache(tmp_path / "c")
    keys = [sequence_key([1], [2]), sequence_key([1], [3]), sequence_key([4], [5]), sequence_key([6], [7])]
    assert cache.lookup(keys).num_rows == 0

    def never_drawn():  # an empty cache does not hash the stage's pairs for nothing
        raise AssertionError("keys drawn from an empty cache's lookup")
        yield

    assert cache.lookup(never_drawn()).num_rows == 0
    cache.add(keys[:2], [-1.0, -2.0], "a")
    cache.add(keys[2:3], [-3.0], "b")
    assert _as_dict(cache.lookup(keys)) == {keys[0]: -1.0, keys[1]: -2.0, keys[2]: -3.0}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.parquet", "b.parquet"]
    schemas.read_table(tmp_path / "c" / "a.parquet", schemas.REFERENCE_CACHE)


def test_lookup_returns_only_the_asked_keys_across_files_and_row_groups(tmp_path):
    cache = ReferenceCache(tmp_path)
    keys = [sequence_key([i], [i + 1]) for i in range(300)]
    cache.add(keys[:200], [-float(i) for i in range(200)], "a")
    cache.add(keys[200:], [-float(i) for i in range(200, 300)], "b")
    asked = keys[5:8] + keys[250:252] + [sequence_key([9999], [1])] + keys[5:6]
    found = cache.lookup(asked)
    assert found.schema == schemas.REFERENCE_CACHE
    assert _as_dict(found) == {keys[i]: -float(i) for i in (5, 6, 7, 250, 251)} and found.num_rows == 5
    assert cache.lookup([]).num_rows == 0


def test_a_cache_file_of_another_schema_is_named_in_the_error(tmp_path):
    keys = pa.array([b"x" * 16], pa.binary(16))
    pq.write_table(pa.table({"sequence_key": keys, "logp": ["-1"]}), tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"bad\.parquet: column 'logp' has type string, expected double"):
        ReferenceCache(tmp_path).lookup([b"x" * 16])


def test_scorer_takes_fully_cached_rows_from_the_cache_and_scores_the_rest(tmp_path):
    rows = [{"pair_id": f"p{i}", "prompt_id": f"q{i}", "prompt": "p", "prompt_ids": [10 + i, 11, 12],
             "chosen": "c", "chosen_ids": [20, 21 + i], "rejected": "r", "rejected_ids": [30, 31, 32 + i],
             "chosen_reward": 1.0, "rejected_reward": 0.0} for i in range(3)]
    table = schemas.rows_to_table(rows, schemas.PAIRS)
    cfg = load_config("configs/tiny.yaml")
    cold = LogProbScorer(ScorerSpec.of(cfg, "builtin:tiny-llama", SIDES))(table)
    # Row 0 fully cached (with marker values the model would never give), row 1 only half: it is scored.
    r0, r1 = rows[0], rows[1]
    ReferenceCache(tmp_path).add([sequence_key(r0["prompt_ids"], r0["chosen_ids"]),
                                  sequence_key(r0["prompt_ids"], r0["rejected_ids"]),
                                  sequence_key(r1["prompt_ids"], r1["chosen_ids"])], [-1.5, -2.5, -3.5], "x")
    known = ReferenceCache(tmp_path).lookup(sequence_key(r["prompt_ids"], r[side]) for r in rows for side in SIDES)
    warm = LogProbScorer(ScorerSpec.of(cfg, "builtin:tiny-llama", SIDES, known))(table)
    assert warm["ref_chosen_logps"][0].as_py() == -1.5 and warm["ref_rejected_logps"][0].as_py() == -2.5
    for i in (1, 2):
        for out in SIDES.values():
            assert math.isclose(warm[out][i].as_py(), cold[out][i].as_py(), abs_tol=1e-4)
    assert warm["ref_chosen_logps"][1].as_py() != -3.5
