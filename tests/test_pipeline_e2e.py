"""pipelines/full.py end to end on the tiny random Llama, through a real local Ray and a real MLflow store.

One module-scoped run (the README's `make run`, as a user would start it) feeds every assertion; a second invocation
checks that finished stages are skipped and that the MLflow parent run is reused.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import doc_command, isolated_env, mlflow_runs, runs_under, sqlite_store, the_parent_run

from dpo_ray import schemas
from dpo_ray.artifacts import read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STAGES = ("sample", "label", "reference", "train", "evaluate")


def run_full(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The README's `make run`, as written, made small through ARGS (as the README says to pass options)."""
    args = shlex.join(["--config", "configs/tiny.yaml", f"run.root={root}", *overrides])
    command = f"{doc_command(REPO / 'README.md', 'make run')} ARGS={shlex.quote(args)}"
    proc = subprocess.run(command, shell=True, cwd=REPO, env=isolated_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    first = run_full(root)
    return root, root / "tiny", first


def test_every_stage_published_with_manifest(tiny_run):
    _, run_dir, first = tiny_run
    for stage in STAGES:
        manifest = read_manifest(run_dir / stage)
        assert manifest is not None and manifest["stage"] == stage, stage
        assert len(manifest["key"]) == 64
        assert f"[dpo-ray] {stage}: running" in first.stdout
    assert not list(run_dir.glob(".*.partial"))
    train = read_manifest(run_dir / "train")
    # The steps' own time, a part of the stage's (the rest is its fixed cost).
    assert 0 < train["stats"]["step_seconds"] < train["seconds"]


def test_parquet_outputs_match_their_schemas(tiny_run):
    _, run_dir, _ = tiny_run
    completions = schemas.read_table(run_dir / "sample" / "completions", schemas.COMPLETIONS)
    prompts = schemas.read_table(run_dir / "sample" / "prompts.parquet", schemas.PROMPTS)
    scored = schemas.read_table(run_dir / "label" / "scored", schemas.SCORED)
    pairs = schemas.read_table(run_dir / "label" / "pairs", schemas.PAIRS)
    reference = schemas.read_table(run_dir / "reference", schemas.REFERENCE)
    samples = schemas.read_table(run_dir / "evaluate" / "eval_samples", schemas.EVAL_SAMPLES)

    n_train = sum(1 for s in prompts["split"].to_pylist() if s == "train")
    assert completions.num_rows == n_train * 4  # tiny.yaml: sample.n = 4
    assert scored.num_rows == completions.num_rows
    assert reference.num_rows == pairs.num_rows > 0
    assert sorted(reference["pair_id"].to_pylist()) == sorted(pairs["pair_id"].to_pylist())
    for row in pairs.to_pylist():
        assert row["chosen_reward"] > row["rejected_reward"]
        assert row["chosen"] != row["rejected"]
    n_eval = sum(1 for s in prompts["split"].to_pylist() if s == "eval")
    assert samples.num_rows == n_eval * 2 * 2  # two models x evaluate.samples_per_prompt
    assert set(samples["model"].to_pylist()) == {"policy", "reference"}


def test_label_counts_add_up(tiny_run):
    _, run_dir, _ = tiny_run
    stats = read_manifest(run_dir / "label")["stats"]
    # best_vs_worst: every prompt yields a pair or is counted as having none.
    assert stats["pairs"] + stats["prompts_without_pair"] == stats["prompts"]
    assert stats["completions"] == read_manifest(run_dir / "sample")["stats"]["completions"]


def test_trained_policy_is_a_loadable_hf_folder(tiny_run):
    from transformers import AutoModelForCausalLM

    _, run_dir, _ = tiny_run
    policy = run_dir / "train" / "policy"
    assert (policy / "model.safetensors").is_file() and (policy / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(policy)
    assert model.config.num_hidden_layers == 2


def test_evaluation_artifacts(tiny_run):
    _, run_dir, _ = tiny_run
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for key in ("policy_reward", "reference_reward", "win_rate", "kl", "implicit_accuracy"):
        assert key in metrics
    assert 0.0 <= metrics["win_rate"] <= 1.0
    # Text quality beside the reward, for both models (dpo_ray.quality).
    for model in ("policy", "reference"):
        assert metrics[f"{model}_fluency"] < 0.0
        for name in ("distinct_1", "distinct_2", "eos_share", "on_task_share"):
            assert 0.0 <= metrics[f"{model}_{name}"] <= 1.0, (model, name)
    samples = schemas.read_table(run_dir / "evaluate" / "eval_samples", schemas.EVAL_SAMPLES)
    assert set(samples["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert (run_dir / "evaluate" / "reward_vs_kl.png").stat().st_size > 1000
    assert "reward" in (run_dir / "evaluate" / "examples.md").read_text()


def test_mlflow_parent_and_stage_runs(tiny_run):
    root, run_dir, _ = tiny_run
    client, runs = mlflow_runs(sqlite_store(root))
    parent = the_parent_run(runs)
    assert parent.data.tags["dpo_ray.run_dir"] == str(run_dir)
    assert parent.data.params["train.beta"] == "0.1"
    assert "eval/win_rate" in parent.data.metrics and "eval/policy_distinct_2" in parent.data.metrics
    children = {r.data.tags["dpo_ray.stage"]: r for r in runs_under(parent, runs)}
    assert set(children) == set(STAGES)
    assert {"policy_fluency", "reference_fluency"} <= set(children["evaluate"].data.metrics)
    train_run = children["train"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_s"):
        assert key in train_run.data.metrics, key
    steps = client.get_metric_history(train_run.info.run_id, "loss")
    assert len(steps) == read_manifest(run_dir / "train")["stats"]["steps"] >= 2
    assert train_run.data.params["train.beta"] == "0.1"  # the stage's own inputs
    # The trained policy, as a model of the train run, stored under the run root.
    models = client.search_logged_models([train_run.info.experiment_id])
    assert [m.name for m in models if m.source_run_id == train_run.info.run_id] == ["policy"]
    assert len(list((root / "mlartifacts").rglob("model.safetensors"))) == 1


def test_rerun_skips_every_stage_and_reuses_parent_run(tiny_run):
    root, run_dir, _ = tiny_run
    keys = {s: read_manifest(run_dir / s)["key"] for s in STAGES}
    second = run_full(root)
    for stage in STAGES:
        assert f"[dpo-ray] {stage}: up to date, skipped" in second.stdout
        assert read_manifest(run_dir / stage)["key"] == keys[stage]
    _, runs = mlflow_runs(sqlite_store(root))
    the_parent_run(runs)
    assert len(runs) == 1 + len(STAGES)


def _reference_side(run_dir: Path) -> tuple[tuple[float, float], list[tuple]]:
    """Whether evaluate took the baseline's samples and rewards from its cache, and that side's rows."""
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    rows = schemas.read_table(run_dir / "evaluate" / "eval_samples", schemas.EVAL_SAMPLES).to_pylist()
    return (metrics["reference_samples_from_cache"], metrics["reference_rewards_from_cache"]), sorted(
        (r["prompt_id"], r["sample_index"], r["completion"], r["reference_logp"], r["reward"])
        for r in rows if r["model"] == "reference")


def test_changed_training_config_reruns_only_train_and_evaluate(tiny_run):
    root, run_dir, _ = tiny_run
    from_cache, sampled = _reference_side(run_dir)
    assert from_cache == (0.0, 0.0) and len(sampled) == 4 * 2
    third = run_full(root, "train.beta=0.2")
    for stage in ("sample", "label", "reference"):
        assert f"[dpo-ray] {stage}: up to date, skipped" in third.stdout
    for stage in ("train", "evaluate"):
        assert f"[dpo-ray] {stage}: running" in third.stdout
    assert read_manifest(run_dir / "train")["inputs"]["train"]["beta"] == 0.2
    # The new policy is judged against the baseline's samples of the first evaluation and their rewards, neither
    # sampled nor scored again.
    assert _reference_side(run_dir) == ((1.0, 1.0), sampled)


def test_offline_pipeline_runs_reference_train_evaluate_on_preference_data(tmp_path):
    """pipelines/offline.py: no sample or label stage of its own; the shipped HH-style pairs feed the round."""
    env = isolated_env()
    proc = subprocess.run(
        [sys.executable, "pipelines/offline.py", f"run.root={tmp_path}", "model.policy=builtin:tiny-llama",
         "run.torch_threads=1", "data.num_eval_prompts=4", "sample.max_new_tokens=8", "train.lr=1e-3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "offline"
    assert not (run_dir / "sample").exists()
    label = read_manifest(run_dir / "label")["stats"]
    assert label["pairs"] == 24
    reference = schemas.read_table(run_dir / "reference", schemas.REFERENCE)
    assert reference.num_rows == 24
    assert read_manifest(run_dir / "train")["stats"]["pairs"] == 24
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["eval_prompts"] == 4


def test_local_ray_dashboard_binds_loopback_only(tiny_run):
    _, _, first = tiny_run
    urls = re.findall(r"View the dashboard at \S*?http://([\d.]+):", first.stdout + first.stderr)
    assert urls == ["127.0.0.1"]
