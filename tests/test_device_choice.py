"""Every model-holding actor puts its model on the device Ray gave it (models.device_for)."""

import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from dpo_ray.config import load_config
from dpo_ray.models import ModelError, device_for, resolve_model
from dpo_ray.models import ModelSpec
from dpo_ray.ops.rewards import RewardModelScorer
from dpo_ray.ops.samplers import SamplerSpec, TransformersSampler
from dpo_ray.ops.scorers import LogProbScorer, ScorerSpec


def test_no_gpu_ids_is_the_cpu():
    assert device_for([]) == torch.device("cpu")


def test_gpu_ids_are_the_first_visible_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for(["3"]) == torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPUs


def test_a_reserved_gpu_that_torch_cannot_see_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"Ray gave this actor GPU\(s\) \[0\] but torch .* sees no CUDA device"):
        device_for([0])


@pytest.fixture()
def reward_model(tmp_path):
    local = resolve_model("builtin:tiny-llama")
    config = AutoConfig.from_pretrained(local, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(local)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return str(tmp_path / "rm")


def test_every_model_actor_asks_ray_for_its_device(monkeypatch, reward_model):
    # Each actor, built as Ray Data builds it, on a worker that Ray gave GPU 0 while torch has no CUDA: each must
    # ask Ray (and so refuse), none may quietly load onto the CPU.
    cfg = load_config(None, ["model.policy=builtin:tiny-llama"])
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    actors = {
        "sample": lambda: TransformersSampler(SamplerSpec.of(cfg, "builtin:tiny-llama", 2, 4, 1.0, 0)),
        "reference": lambda: LogProbScorer(ScorerSpec.of(cfg, "builtin:tiny-llama", {"chosen_ids": "ref_chosen_logps"})),
        "reward model": lambda: RewardModelScorer(ModelSpec.of(cfg, reward_model), cfg.label.batch_size),
    }
    for name, build in actors.items():
        with pytest.raises(ModelError, match="Ray gave this actor GPU"):
            build()
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
        assert build() is not None, name
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
