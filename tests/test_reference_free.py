"""Reference-free losses (simpo, orpo), length normalization and the memory savers (gradient checkpointing,
ZeRO-Offload): the config's checks, the stage keys, and the DAG that skips the reference stage for the
reference-free losses (no Ray: the stage runner is replaced by one that records its calls)."""

from __future__ import annotations

import pytest

from dpo_ray.config import ConfigError, load_config
from dpo_ray.pipeline import prepare_pairs
from dpo_ray.stages import label, reference, sample, train


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=ipo", "train.label_smoothing=0.1"], r"^train\.label_smoothing: applies to the sigmoid and simpo"),
    (["train.loss=orpo", "train.rpo_alpha=0.5"], r"^train\.rpo_alpha: orpo already has its NLL term"),
    (["train.loss=simpo", "train.length_normalize=true"], r"^train\.length_normalize: simpo is length-normalized"),
    (["train.loss=orpo", "reference.replay_share=0.25"],
     r"^reference\.replay_share: replay is drawn by the reference stage, which train\.loss=orpo skips"),
    (["train.offload_optimizer=true"], r"^train\.offload_optimizer: needs train\.strategy=deepspeed"),
    (["train.loss=kto"], r"^train\.loss: Input should be 'sigmoid', 'ipo', 'hinge', 'simpo' or 'orpo'"),
])
def test_loss_options_that_do_not_apply_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_new_loss_keys_leave_the_train_key_unchanged_at_their_default():
    def train_key(*overrides):
        return train.inputs(load_config("configs/default.yaml", list(overrides)), {"reference": "r"})

    default = train_key()
    assert "simpo_gamma" not in default["train"] and "length_normalize" not in default["train"]
    assert train_key("train.length_normalize=true") != default
    assert train_key("train.gradient_checkpointing=true") != default
    assert train_key("train.strategy=deepspeed", "train.offload_optimizer=true") != train_key("train.strategy=deepspeed")
    assert train_key("train.loss=simpo") != train_key("train.loss=simpo", "train.simpo_gamma=1.0")


class RecordingRunner:
    """Stands in for runner.StageRunner: records which stage ran into which folder from which sources."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, cfg, out, sources=None, **_):
        self.calls.append((module, out, dict(sources or {})))
        return {"stats": {}}


@pytest.mark.parametrize("loss, frontier, runs_reference", [
    ("sigmoid", None, True),
    ("simpo", None, False),
    ("orpo", None, False),
    ("simpo", ["simpo", "orpo"], False),
    ("simpo", ["simpo", "sigmoid"], True),  # one variant needs the reference, so all share its pairs
])
def test_the_reference_stage_runs_only_when_a_loss_needs_it(tmp_path, loss, frontier, runs_reference):
    cfg = load_config("configs/tiny.yaml", [f"train.loss={loss}", f"run.root={tmp_path}"])
    stage = RecordingRunner()
    pairs = prepare_pairs(cfg, tmp_path, stage, losses=frontier)
    assert [call[0] for call in stage.calls] == [sample, label, *([reference] if runs_reference else [])]
    assert pairs.reference_dir == (tmp_path / "reference" if runs_reference else tmp_path / "label" / "pairs")
