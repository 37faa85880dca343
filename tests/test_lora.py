"""LoRA (train.lora) without Ray: only the adapter trains, its folder loads merged onto its base wherever a model is
loaded, a checkpoint's adapter resumes exactly, and the published policy equals base + adapter."""

from __future__ import annotations

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


def test_vllm_refuses_an_adapter_policy_before_starting_actors(tmp_path):
    import pytest

    from dpo_ray.errors import ConfigError
    from dpo_ray.ops.samplers import sample_dataset

    _trained_adapter(tmp_path / "adapter")
    cfg = load_config("configs/tiny.yaml", ["sample.backend=vllm"])
    with pytest.raises(ConfigError, match=r"^sample\.backend: vllm is not wired to LoRA adapters yet"):
        sample_dataset(None, cfg, str(tmp_path / "adapter"), 2, 4, 1.0, 0)
