"""Stage artifacts (publish, manifests, digests, keys) and the config redaction used for MLflow params."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray import artifacts
from dpo_ray.config import PipelineConfig
from dpo_ray.tracking import REDACTED, flatten, redact

# ---------------------------------------------------------------------------------------------- artifacts


def write_parquet(path: Path, n: int = 50) -> None:
    pq.write_table(pa.table({"x": list(range(n)), "s": [f"row {i}" for i in range(n)]}), path)


def make_stage_output(folder: Path, tag: str) -> None:
    folder.mkdir(parents=True)
    write_parquet(folder / "pairs.parquet")
    (folder / "stats.json").write_text(json.dumps({"tag": tag}))


def test_publish_writes_manifest_then_swaps(tmp_path, monkeypatch):
    final = tmp_path / "label"
    tmp = artifacts.partial_dir(final)
    make_stage_output(tmp, "new")
    events = []
    real_write = artifacts.write_json_atomic

    def spy(path, data):
        # At manifest time every data file is already in tmp and final is not yet in place.
        events.append(("manifest", sorted(p.name for p in tmp.iterdir()), final.exists()))
        real_write(path, data)

    monkeypatch.setattr(artifacts, "write_json_atomic", spy)
    manifest = artifacts.publish(tmp, final, {"stage": "label", "key": "k1"})
    assert events == [("manifest", ["pairs.parquet", "stats.json"], False)]
    assert not tmp.exists()
    assert sorted(p.name for p in final.iterdir()) == [artifacts.MANIFEST, "pairs.parquet", "stats.json"]
    on_disk = artifacts.read_manifest(final)
    assert on_disk == manifest
    assert on_disk["stage"] == "label" and on_disk["key"] == "k1"
    assert on_disk["output_digest"] == artifacts.folder_digest(final)
    assert "finished_at" in on_disk


def test_publish_replaces_existing_folder(tmp_path):
    final = tmp_path / "label"
    make_stage_output(final, "old")
    (final / "leftover.parquet").write_bytes(b"old only")
    artifacts.write_json_atomic(final / artifacts.MANIFEST, {"key": "old"})
    tmp = artifacts.partial_dir(final)
    make_stage_output(tmp, "new")
    artifacts.publish(tmp, final, {"key": "new"})
    assert artifacts.read_manifest(final)["key"] == "new"
    assert json.loads((final / "stats.json").read_text()) == {"tag": "new"}
    assert not (final / "leftover.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label"]  # no .partial or .stale left behind


def test_read_manifest_missing_or_corrupt(tmp_path):
    assert artifacts.read_manifest(tmp_path / "absent") is None
    folder = tmp_path / "stage"
    folder.mkdir()
    assert artifacts.read_manifest(folder) is None
    (folder / artifacts.MANIFEST).write_text('{"key": "abc", "stats": {')
    assert artifacts.read_manifest(folder) is None
    (folder / artifacts.MANIFEST).write_text("")
    assert artifacts.read_manifest(folder) is None
    (folder / artifacts.MANIFEST).write_text('{"key": "abc"}')
    assert artifacts.read_manifest(folder) == {"key": "abc"}


def test_read_manifest_corrupt_bytes(tmp_path):
    # A manifest damaged into invalid UTF-8 must read as "not complete", like any other corrupt manifest.
    (tmp_path / artifacts.MANIFEST).write_bytes(b'{"key": "\xff\xfe\x00')
    assert artifacts.read_manifest(tmp_path) is None


def test_read_manifest_not_an_object(tmp_path):
    # The pipeline calls .get on what read_manifest returns: valid JSON that is not an object is not a manifest.
    (tmp_path / artifacts.MANIFEST).write_text("[1, 2, 3]")
    assert artifacts.read_manifest(tmp_path) is None


def test_input_key_order_insensitive():
    a = {"stage": "label", "config": {"beta": 0.1, "n": 4, "nested": {"x": 1, "y": [1, 2]}}, "upstream": "k"}
    b = {"upstream": "k", "config": {"nested": {"y": [1, 2], "x": 1}, "n": 4, "beta": 0.1}, "stage": "label"}
    assert artifacts.input_key(a) == artifacts.input_key(b)
    assert len(artifacts.input_key(a)) == 64


def test_input_key_sensitive_to_values():
    base = {"config": {"beta": 0.1, "n": 4}, "models": ["a", "b"]}
    key = artifacts.input_key(base)
    assert artifacts.input_key({"config": {"beta": 0.2, "n": 4}, "models": ["a", "b"]}) != key
    assert artifacts.input_key({"config": {"beta": 0.1, "n": 4}, "models": ["b", "a"]}) != key  # lists keep order
    assert artifacts.input_key({"config": {"beta": 0.1, "n": 4, "x": None}, "models": ["a", "b"]}) != key
    assert artifacts.input_key({"path": Path("/a/b")}) == artifacts.input_key({"path": "/a/b"})


def test_folder_digest_changes_with_one_parquet_byte(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    write_parquet(folder / "data.parquet")
    before = artifacts.folder_digest(folder)
    assert artifacts.folder_digest(folder) == before  # stable
    raw = bytearray((folder / "data.parquet").read_bytes())
    middle = len(raw) // 2
    raw[middle] ^= 0x01
    (folder / "data.parquet").write_bytes(bytes(raw))
    assert artifacts.folder_digest(folder) != before


def test_folder_digest_ignores_manifest_and_sees_names(tmp_path):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    write_parquet(folder / "sub" / "part-0.parquet")
    before = artifacts.folder_digest(folder)
    artifacts.write_json_atomic(folder / artifacts.MANIFEST, {"key": "x"})
    assert artifacts.folder_digest(folder) == before
    (folder / "sub" / "part-0.parquet").rename(folder / "sub" / "part-1.parquet")
    assert artifacts.folder_digest(folder) != before


def test_folder_digest_weights_by_name_size_and_mtime(tmp_path):
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\x00" * 64)
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    before = artifacts.folder_digest(weights.parent)
    weights.write_bytes(b"\x01" * 64)  # the bytes are not read: same size and mtime, same digest
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    assert artifacts.folder_digest(weights.parent) == before
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))  # retrained in place: same size, newer file
    assert artifacts.folder_digest(weights.parent) != before
    weights.write_bytes(b"\x01" * 65)
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    assert artifacts.folder_digest(weights.parent) != before


# ----------------------------------------------------------------------------------------------- tracking


@pytest.mark.parametrize("key", ["hf_token", "HF_TOKEN", "api_key", "apiKey", "password", "db_passwd",
                                 "AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "client_secret", "credentials"])
def test_redact_secret_keys(key):
    out = redact({key: "s3cr3t", "beta": 0.1})
    assert out == {key: REDACTED, "beta": 0.1}


def test_redact_nested_and_none_and_no_mutation():
    tree = {"hub": {"hf_token": "abc", "repo": "me/model"}, "api_key": None, "train": {"beta": 0.1}}
    out = redact(tree)
    assert out == {"hub": {"hf_token": REDACTED, "repo": "me/model"}, "api_key": None, "train": {"beta": 0.1}}
    assert tree["hub"]["hf_token"] == "abc"


@pytest.mark.parametrize("key", ["beta", "lr", "tokenizer_name", "max_new_tokens", "max_prompt_tokens",
                                 "max_completion_tokens"])
def test_redact_keeps_non_secret_keys(key):
    assert redact({key: 7}) == {key: 7}


def test_redact_keeps_the_whole_default_config():
    # The pipeline's own config holds no secrets, so every logged param must keep its value.
    tree = PipelineConfig().model_dump(mode="json")
    flat, redacted = flatten(tree), flatten(redact(tree))
    changed = sorted(k for k in flat if flat[k] != redacted[k])
    assert changed == []


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": None, "e": [1, 2]}
    flat = flatten(PipelineConfig().model_dump(mode="json"))
    assert flat["train.beta"] == 0.1 and flat["sample.n"] == 4


def test_parent_run_is_found_again_for_a_run_root_with_quotes(tmp_path, monkeypatch):
    from dpo_ray.config import load_config
    from dpo_ray.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "it's \"quoted\""
    root.mkdir()
    cfg = load_config(None, [f"run.root={root}", "run.name=quoted"])
    other = load_config(None, [f"run.root={tmp_path}", "run.name=other"])
    ids = []
    for c in (cfg, other, cfg):
        with Tracker(c).parent() as run:
            ids.append(run.info.run_id)
    assert ids[0] == ids[2] != ids[1]


def test_local_store_keeps_artifacts_under_the_run_root_in_the_model_training_view(tmp_path, monkeypatch):
    import mlflow

    from dpo_ray.config import load_config
    from dpo_ray.tracking import EXPERIMENT_KIND, Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    root = tmp_path / "runs"
    cfg = load_config(None, [f"run.root={root}"])
    tracker = Tracker(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.run.experiment)
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    with tracker.parent():
        with tracker.stage("evaluate", {"evaluate": {"samples_per_prompt": 2}}, tmp_path / "evaluate"):
            (tmp_path / "metrics.json").write_text("{}")
            mlflow.log_artifact(str(tmp_path / "metrics.json"))
    assert len(list((root / "mlartifacts").rglob("metrics.json"))) == 1
    assert not (tmp_path / "mlruns").exists()


def test_trained_policy_is_logged_as_a_registered_transformers_model(tmp_path, monkeypatch):
    import shutil

    import mlflow

    from dpo_ray.config import load_config
    from dpo_ray.models import resolve_model
    from dpo_ray.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.registered_model=dpo-policy"])
    stage = tmp_path / "train"
    shutil.copytree(resolve_model("builtin:tiny-llama"), stage / "policy")
    (stage / "train_summary.json").write_text("{}")
    tracker = Tracker(cfg)
    with tracker.parent():
        with tracker.stage("train", {"train": {"beta": 0.1}}, stage) as run_id:
            tracker.log_stage({"steps": 3}, stage)
    (model,) = mlflow.search_logged_models(output_format="list")
    assert (model.source_run_id, model.name) == (run_id, "policy")
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'dpo-policy'")
    assert version.run_id == run_id
    loaded = Path(mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(tmp_path / "back")))
    weights = "model.safetensors"
    assert (loaded / "model" / weights).read_bytes() == (stage / "policy" / weights).read_bytes()


def test_stage_runs_carry_their_inputs_and_a_rerun_tags_what_changed(tmp_path, monkeypatch):
    import mlflow

    from dpo_ray.config import load_config
    from dpo_ray.tracking import CHANGED_PARAMS_TAG, Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_config(None, [f"run.root={tmp_path}", "run.log_model=false"])
    changed = load_config(None, [f"run.root={tmp_path}", "run.log_model=false", "train.beta=0.25"])
    for cfg in (first, changed):
        tracker = Tracker(cfg)
        with tracker.parent() as parent:
            with tracker.stage("train", {"train": cfg.train.model_dump(), "reference": "abc"},
                               tmp_path / "train") as run_id:
                pass
        stage_params = mlflow.get_run(run_id).data.params
        assert stage_params["train.beta"] == str(cfg.train.beta) and stage_params["reference"] == "abc"
    parent = mlflow.get_run(parent.info.run_id).data
    assert parent.params["train.beta"] == "0.1"  # MLflow keeps a param's first value
    assert parent.tags[CHANGED_PARAMS_TAG] == "train.beta"
