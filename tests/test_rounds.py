"""Iterative rounds on the tiny model: round 2 samples from round 1's policy and self-labels with its implicit reward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import check_run_tree, isolated_env, mlflow_runs, sqlite_store

from dpo_ray.artifacts import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STAGES = ("sample", "label", "reference", "train", "evaluate")


def test_two_rounds_with_self_labeling(tmp_path):
    overrides = [
        f"run.root={tmp_path}", "run.name=rounds", "rounds.count=2", "evaluate.labeler=sentiment",
        # Round 2 self-labels with round 1's implicit reward, filtered by the external sentiment reward.
        "rounds.overrides={2: {label: {labeler: implicit, min_margin: 0.0, filter_labeler: sentiment}}}",
        "data.num_train_prompts=16",
    ]
    env = isolated_env()
    cmd = [sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "rounds"
    for k in (1, 2):
        for stage in STAGES:
            assert read_manifest(run_dir / f"round_{k}" / stage) is not None, (k, stage)
    # Round 2 trained from, sampled from and self-labeled with round 1's policy.
    round1_policy = str(run_dir / "round_1" / "train" / "policy")
    assert read_manifest(run_dir / "round_2" / "label")["inputs"]["label"]["labeler"] == "implicit"
    _check_filter(run_dir)
    config = json.loads((run_dir / "round_2" / "train" / "manifest.json").read_text())
    assert config["inputs"]["init"] is None  # rounds.init=previous: the policy itself is round 1's
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert (run_dir / "rounds.png").is_file() and "| 2 |" in (run_dir / "rounds.md").read_text()
    assert round1_policy in proc.stdout or "round 2/2" in proc.stdout

    _, runs = mlflow_runs(sqlite_store(tmp_path))
    check_run_tree(runs, {"round_1", "round_2"}, STAGES)

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") == 2 * len(STAGES)
    _, runs_after = mlflow_runs(sqlite_store(tmp_path))
    assert len(runs_after) == len(runs)


def _check_filter(run_dir: Path) -> None:
    """Round 1 has no filter column values; in round 2 every kept pair is one the sentiment filter does not
    contradict, and the stage counted what it dropped."""
    from dpo_ray import schemas
    from dpo_ray.ops.rewards import SentimentScorer

    assert schemas.read_table(run_dir / "round_1" / "label" / "scored", schemas.SCORED)["filter_reward"].null_count > 0
    scored = schemas.read_table(run_dir / "round_2" / "label" / "scored", schemas.SCORED).to_pylist()
    assert all(r["filter_reward"] is not None for r in scored)
    vader = SentimentScorer().analyzer
    for r in scored[:8]:
        assert r["filter_reward"] == vader.polarity_scores(r["completion"])["compound"]
    filter_of = {(r["prompt_id"], r["completion"]): r["filter_reward"] for r in scored}
    pairs = schemas.read_table(run_dir / "round_2" / "label" / "pairs", schemas.PAIRS).to_pylist()
    assert pairs
    for p in pairs:
        assert filter_of[(p["prompt_id"], p["chosen"])] >= filter_of[(p["prompt_id"], p["rejected"])]
    stats = read_manifest(run_dir / "round_2" / "label")["stats"]
    assert "filter_disagreed" in stats and stats["pairs"] == len(pairs)
