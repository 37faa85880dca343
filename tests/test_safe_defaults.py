"""Safe defaults: no remote code, no pickled weights, weights_only torch.load, and clear model errors at start."""

from __future__ import annotations

import ast
import json
import platform
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from dpo_ray.config import load_config
from dpo_ray.models import ModelError, load_causal_lm, resolve_model
from dpo_ray.ops import scorers
from dpo_ray.ops.rewards import check_labeler
from dpo_ray.stages.train import _worker_env

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dpo_ray"


def test_remote_code_in_a_model_folder_is_not_run_by_default(tmp_path):
    marker = tmp_path / "remote-code-ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.Evil"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(str(tmp_path))
    assert not marker.exists()


def test_pickled_weights_are_refused(tmp_path):
    model = make_tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_causal_lm(str(tmp_path))


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "expected the resume path's torch.load"
    assert all(safe for _, safe in calls), calls


def test_missing_model_folder_is_a_clear_error():
    with pytest.raises(ModelError, match=r"^model path /no/such/model does not exist$"):
        resolve_model("/no/such/model")


def test_reward_model_with_a_two_class_head_fails_before_any_actor(tmp_path):
    config = make_tiny_llama().config
    config.num_labels = 2
    config.save_pretrained(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"label.reward_model={tmp_path}"])
    with pytest.raises(ModelError, match=r"^label\.reward_model: .* has a 2-output head; a reward model needs a "
                                         r"single-score head \(num_labels=1\)$"):
        check_labeler(cfg, "reward_model")
    check_labeler(cfg, "sentiment")  # only a reward model is loaded to be checked
    config.num_labels = 1
    config.save_pretrained(tmp_path)
    check_labeler(cfg, "reward_model")


def test_train_workers_cap_glibc_arenas_unless_the_driver_sets_it(monkeypatch):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert _worker_env(cfg)["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert _worker_env(cfg)["MALLOC_ARENA_MAX"] == "8"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_scorer_returns_free_heap_after_each_batch_on_glibc():
    # Without it the scorer actor's peak memory grew with the number of batches (benchmarks/README.md, figure 4).
    assert scorers._malloc_trim is not None
    assert scorers._malloc_trim(0) in (0, 1)
