"""Iterative rounds on the tiny model, as README's recipe (configs/rounds.yaml) runs them: round 1 labeled by
sentiment, rounds 2-3 self-labeled by the previous policy's implicit reward filtered by sentiment and guarded by the
initial model's fluency, each round within its share of the KL budget, replaying earlier pairs, audited by a judge
and a second sentiment lexicon that never train. (The soft reference's stage and its place between rounds are
tested without a cluster in test_rounds_mechanics.py.)"""

import json
import re
import subprocess
from pathlib import Path

import pyarrow.compute as pc
import pytest
from conftest import check_run_tree, isolated_env, mlflow_runs, sqlite_store

from dpo_ray import schemas
from dpo_ray.artifacts import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STAGES = ("sample", "label", "reference", "train", "evaluate")
# What makes the recipe small: the tiny model as policy and judge, few samples and tokens, a learning rate the
# tiny model moves at. Its random text leaves a self-labeled pair on one prompt in 12-24 once the sentiment filter
# and the fluency guard have run, so rounds sample 2 completions of each of 96 prompts.
SMALL = ["model.policy=builtin:tiny-llama", "label.judge_model=builtin:tiny-llama", "data.num_train_prompts=96",
         "sample.n=2", "data.num_eval_prompts=4", "sample.max_new_tokens=12", "train.lr=1e-3", "train.batch_size=4",
         "train.micro_batch_size=2", "train.kl_probe_prompts=4", "train.checkpoint_every=2", "run.torch_threads=1"]


def test_the_rounds_recipe_runs_as_the_readme_writes_it(tmp_path):
    line = next(m.group(1) for m in re.finditer(r"`([^`]*pipelines/full\.py --config configs/rounds\.yaml[^`]*)`",
                                                 (REPO / "README.md").read_text()))
    command = " ".join([line, *SMALL, f"run.root={tmp_path}"])
    env = isolated_env()
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "rounds"
    for k in (1, 2, 3):
        for stage in STAGES:
            assert read_manifest(run_dir / f"round_{k}" / stage) is not None, (k, stage)
    # Rounds 2-3 trained from and self-labeled with the previous round's policy.
    assert read_manifest(run_dir / "round_2" / "label")["inputs"]["label"]["labeler"] == "implicit"
    assert read_manifest(run_dir / "round_3" / "train")["inputs"]["init"] is None  # rounds.init=previous
    _check_filter(run_dir)
    _check_fluency_guard(run_dir)
    _check_kl_budget(run_dir)
    _check_replay(run_dir)
    # Every round is judged on round 1's held-out prompts and the baseline's samples of them, sampled once.
    held_out = [schemas.read_table(run_dir / f"round_{k}" / "sample" / "prompts.parquet", schemas.PROMPTS)
                .filter(pc.equal(pc.field("split"), "eval"))["prompt_id"].to_pylist() for k in (1, 2, 3)]
    assert held_out[0] and held_out[0] == held_out[1] == held_out[2]
    metrics = [json.loads((run_dir / f"round_{k}" / "evaluate" / "metrics.json").read_text()) for k in (1, 2, 3)]
    assert [m["reference_samples_from_cache"] for m in metrics] == [0.0, 1.0, 1.0]
    # And their VADER and TextBlob rewards with them; the judge compares both sides, so it judges both every round.
    assert [m["reference_rewards_from_cache"] for m in metrics] == [0.0, 2.0, 2.0]
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(0 <= r["audit_judge_win_rate"] <= 1 and 0 <= r["audit_textblob_win_rate"] <= 1
               and isinstance(r["divergence"], list) for r in rounds)
    _check_textblob_audit(run_dir)
    table = (run_dir / "rounds.md").read_text()
    assert "| 3 |" in table and "judge win rate" in table and "textblob win rate" in table
    assert (run_dir / "rounds.png").is_file()
    assert "round 3/3" in proc.stdout
    assert "audit judge: policy" in proc.stdout and "audit textblob: policy" in proc.stdout

    _, runs = mlflow_runs(sqlite_store(tmp_path))
    check_run_tree(runs, {"round_1", "round_2", "round_3"}, STAGES)

    again = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") == 3 * len(STAGES)
    _, runs_after = mlflow_runs(sqlite_store(tmp_path))
    assert len(runs_after) == len(runs)


def _check_filter(run_dir: Path) -> None:
    """Round 1 has no filter column values; in round 2 every kept pair is one the sentiment filter does not
    contradict, and the stage counted what it dropped."""
    from dpo_ray.ops.rewards import vader

    assert schemas.read_table(run_dir / "round_1" / "label" / "scored", schemas.SCORED)["filter_reward"].null_count > 0
    scored = schemas.read_table(run_dir / "round_2" / "label" / "scored", schemas.SCORED).to_pylist()
    assert all(r["filter_reward"] is not None for r in scored)
    for r in scored[:8]:
        assert r["filter_reward"] == vader().polarity_scores(r["completion"])["compound"]
    filter_of = {(r["prompt_id"], r["completion"]): r["filter_reward"] for r in scored}
    pairs = schemas.read_table(run_dir / "round_2" / "label" / "pairs", schemas.PAIRS).to_pylist()
    assert pairs
    for p in pairs:
        assert filter_of[(p["prompt_id"], p["chosen"])] >= filter_of[(p["prompt_id"], p["rejected"])]
    stats = read_manifest(run_dir / "round_2" / "label")["stats"]
    assert "filter_disagreed" in stats and stats["pairs"] == len(pairs)


def _check_fluency_guard(run_dir: Path) -> None:
    """Round 1 (sentiment) has no reference log-prob per token; in rounds 2-3 (implicit, label.fluency_guard=0) every
    completion has it, it is the reference stage's log-prob of the same tokens over their count, and no kept pair's
    chosen is less fluent than its rejected."""
    assert schemas.read_table(run_dir / "round_1" / "label" / "scored",
                              schemas.SCORED)["reference_token_logp"].null_count > 0
    for k in (2, 3):
        scored = schemas.read_table(run_dir / f"round_{k}" / "label" / "scored", schemas.SCORED).to_pylist()
        fluency = {(r["prompt_id"], r["completion"]): r["reference_token_logp"] for r in scored}
        assert None not in fluency.values()
        pairs = schemas.read_table(run_dir / f"round_{k}" / "label" / "pairs", schemas.PAIRS).to_pylist()
        for p in pairs:
            assert fluency[(p["prompt_id"], p["chosen"])] >= fluency[(p["prompt_id"], p["rejected"])]
        stats = read_manifest(run_dir / f"round_{k}" / "label")["stats"]
        assert stats["pairs"] == len(pairs) and "fluency_guard_dropped" in stats
        # The labeler's reference is the reference stage's (rounds.reference=initial): the same log-probs.
        referenced = schemas.read_table(run_dir / f"round_{k}" / "reference", schemas.REFERENCE).to_pylist()
        own = [r for r in referenced if not r["pair_id"].startswith("replay")]
        assert own
        for r in own:
            per_token = r["ref_chosen_logps"] / max(1, len(r["chosen_ids"]))
            assert fluency[(r["prompt_id"], r["chosen"])] == pytest.approx(per_token, abs=1e-4)


def _check_kl_budget(run_dir: Path) -> None:
    """rounds.kl_budget=12 over 3 rounds: 4, 8, 12 nats; each round kept a checkpoint within it or said it could
    not."""
    budgets = [read_manifest(run_dir / f"round_{k}" / "train")["stats"] for k in (1, 2, 3)]
    assert [b["kl_budget"] for b in budgets] == [4, 8, 12]
    for b in budgets:
        assert b["kept_kl"] <= b["kl_budget"] if b["kl_budget_met"] else b["kept_kl"] > b["kl_budget"]
        assert b["kl_probes"][0]["step"] == b["steps"]


def _check_textblob_audit(run_dir: Path) -> None:
    """The TextBlob audit scored every held-out sample with TextBlob's polarity of its text, never trained."""
    from dpo_ray.ops.rewards import textblob

    samples = schemas.read_table(run_dir / "round_3" / "evaluate" / "eval_samples", schemas.EVAL_SAMPLES).to_pylist()
    assert samples
    for r in samples:
        assert dict(r["audit_rewards"])["textblob"] == textblob().analyze(r["completion"]).polarity
    for k in (1, 2, 3):
        assert "textblob" not in json.dumps(read_manifest(run_dir / f"round_{k}" / "label")["inputs"]["label"])


def _check_replay(run_dir: Path) -> None:
    """A quarter of rounds 2-3's pairs come from the earlier rounds' own pairs, scored before by the same (initial)
    reference: from the cache."""
    from dpo_ray.pairs import replay_count

    assert read_manifest(run_dir / "round_1" / "reference")["stats"].get("replayed_pairs") is None
    own = {k: read_manifest(run_dir / f"round_{k}" / "label")["stats"]["pairs"] for k in (1, 2, 3)}
    for k in (2, 3):
        stats = read_manifest(run_dir / f"round_{k}" / "reference")["stats"]
        pool = sum(own[j] for j in range(1, k))
        assert stats["replay_pool"] == pool and stats["replayed_pairs"] == replay_count(own[k], pool, 0.25) > 0
        assert stats["pairs"] == own[k] + stats["replayed_pairs"]
        assert stats["pairs_from_cache"] >= stats["replayed_pairs"]
        trained = schemas.read_table(run_dir / f"round_{k}" / "reference", schemas.REFERENCE)["pair_id"].to_pylist()
        assert sum(pair_id.startswith("replay") for pair_id in trained) == stats["replayed_pairs"]
