"""LoRA (train.lora) without Ray: only the adapter trains, its folder loads merged onto its base wherever a model is
loaded, a checkpoint's adapter resumes exactly, the published policy equals base + adapter, and the vLLM backend
refuses, in the driver, an adapter it cannot serve."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_ray.config import LoraSettings, load_config
from dpo_ray.engines import ADAPTER_DIR, POLICY_DIR, load_policy_weights
from dpo_ray.models import adapter_base, load_causal_lm, model_fingerprint, with_lora
from dpo_ray.stages.train import publish_policy

BASE = "builtin:tiny-llama"
IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


def _trained_adapter(folder, seed=0):
    """A LoRA model on the tiny base whose adapter is not the identity (B != 0), saved to `folder`."""
    model = with_lora(load_causal_lm(BASE), LoraSettings(r=2), BASE).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_only_the_adapter_trains_and_the_base_is_named_as_configured():
    model = with_lora(load_causal_lm(BASE), LoraSettings(r=2, target_modules=["q_proj", "v_proj"]), BASE)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert model.peft_config["default"].base_model_name_or_path == BASE


def test_an_adapter_folder_loads_merged_and_is_fingerprinted_with_its_base(tmp_path):
    model = _trained_adapter(tmp_path / "adapter")
    assert adapter_base(tmp_path / "adapter") == BASE
    with torch.no_grad():
        expected = model(IDS).logits
        base_logits = load_causal_lm(BASE)(IDS).logits
        merged = load_causal_lm(str(tmp_path / "adapter"))(IDS).logits
    assert not torch.allclose(expected, base_logits)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    _trained_adapter(tmp_path / "other", seed=1)
    assert model_fingerprint(str(tmp_path / "adapter")) != model_fingerprint(str(tmp_path / "other"))


def test_a_checkpoints_adapter_resumes_exactly(tmp_path):
    model = _trained_adapter(tmp_path / "adapter")
    fresh = with_lora(load_causal_lm(BASE), LoraSettings(r=2), BASE).eval()
    load_policy_weights(fresh, tmp_path / "adapter")
    from peft import get_peft_model_state_dict

    saved, loaded = get_peft_model_state_dict(model), get_peft_model_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_the_published_policy_is_the_merged_model_or_the_adapter(tmp_path):
    model = _trained_adapter(tmp_path / "checkpoint")
    with torch.no_grad():
        expected = model(IDS).logits
    for merge in (True, False):
        cfg = load_config("configs/tiny.yaml", [f"train.lora={{r: 2, merge: {str(merge).lower()}}}"])
        out = tmp_path / f"merge_{merge}"
        out.mkdir()
        publish_policy(tmp_path / "checkpoint", out, cfg)
        assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert (out / POLICY_DIR / "model.safetensors").is_file() == merge
        assert (adapter_base(out / POLICY_DIR) is None) == merge
        with torch.no_grad():
            torch.testing.assert_close(load_causal_lm(str(out / POLICY_DIR))(IDS).logits, expected,
                                       atol=1e-4, rtol=1e-4)


def _edited_adapter(folder, **config):
    """A trained adapter in `folder` whose adapter_config.json then gets `config`."""
    _trained_adapter(folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))


def _peft_adapter(folder, **lora):
    """An adapter on the tiny base saved by peft with LoraConfig options that train.lora does not offer."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(BASE), LoraConfig(r=2, task_type="CAUSAL_LM", **lora))
    model.peft_config["default"].base_model_name_or_path = BASE
    model.save_pretrained(folder, safe_serialization=True)


def test_vllm_takes_a_linear_lora_adapter_at_the_rank_it_serves(tmp_path):
    from dpo_ray.ops.samplers import VLLMSampler

    _trained_adapter(tmp_path / "r2")
    assert VLLMSampler.lora_rank(str(tmp_path / "r2")) == 8  # vLLM's smallest max_lora_rank above 1
    _edited_adapter(tmp_path / "pattern", rank_pattern={"q_proj": 16})
    assert VLLMSampler.lora_rank(str(tmp_path / "pattern")) == 16


@pytest.mark.parametrize("make, words", [
    (lambda f: _edited_adapter(f, use_dora=True), "DoRA (use_dora: True)"),
    (lambda f: _edited_adapter(f, r=1024), "rank 1024 (vLLM serves at most 512)"),
    (lambda f: _edited_adapter(f, init_lora_weights="pissa"), "init_lora_weights: pissa"),
    (lambda f: _edited_adapter(f, base_model_name_or_path=str(f.parent / "first")), "is itself an adapter"),
    (lambda f: _peft_adapter(f, modules_to_save=["lm_head"]), "whole trained modules (modules_to_save: ['lm_head'])"),
    (lambda f: _peft_adapter(f, target_modules=["embed_tokens", "q_proj"]), "tensors model.embed_tokens."),
], ids=["dora", "rank", "init", "stacked", "modules_to_save", "embedding"])
def test_vllm_refuses_an_adapter_it_cannot_serve_in_one_line_before_starting_actors(tmp_path, make, words):
    from dpo_ray.errors import ConfigError
    from dpo_ray.ops.samplers import sample_dataset

    _trained_adapter(tmp_path / "first")
    make(tmp_path / "adapter")
    cfg = load_config("configs/tiny.yaml", ["sample.backend=vllm"])
    # No dataset: the refusal comes before sample_dataset builds the actor pool.
    with pytest.raises(ConfigError, match=r"^sample\.backend: vllm cannot serve the adapter ") as err:
        sample_dataset(None, cfg, str(tmp_path / "adapter"), 2, 4, 1.0, 0)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_rounds_of_unmerged_adapters_under_vllm_are_refused_at_load():
    """Round 2 would train an adapter on round 1's adapter, which vLLM cannot sample: said before round 1 runs."""
    with pytest.raises(ValueError, match="train.lora.merge: false makes round 2 train an adapter"):
        load_config("configs/tiny.yaml", ["rounds.count=2", "train.lora={merge: false}", "sample.backend=vllm"])
    assert load_config("configs/tiny.yaml", ["rounds.count=2", "train.lora={merge: false}"]).train.lora.merge is False
