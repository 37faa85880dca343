"""Every model-holding actor puts its model on the device Ray gave it (models.device_for)."""

import pytest
import ray
import torch

from dpo_ray.config import load_config
from dpo_ray.models import ModelError, device_for
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


def test_the_reward_model_sees_one_bos_whether_or_not_its_chat_template_writes_one(monkeypatch, reward_model):
    """A chat template that writes BOS itself (Llama 3's does) must not get a second one from the tokenizer; a
    reward model without a template gets the tokenizer's usual special tokens."""
    from transformers import AutoTokenizer

    cfg = load_config(None, ["model.policy=builtin:tiny-llama"])
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    scorer = RewardModelScorer(ModelSpec.of(cfg, reward_model), cfg.label.batch_size)
    scorer.tokenizer.add_bos_token = True  # as Llama 3's tokenizer does
    bos = scorer.tokenizer.bos_token_id
    assert scorer.tokenizer("Review Heat.")["input_ids"][0] == bos
    scorer.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                      "{% endfor %}")
    ids = scorer.encode(["Review Heat."], [None], ["Great film."])["input_ids"][0].tolist()
    assert ids.count(bos) == 1 and ids[0] == bos
    plain = AutoTokenizer.from_pretrained(reward_model, add_bos_token=True)
    scorer.tokenizer.chat_template = None
    ids = scorer.encode(["Review Heat."], [None], ["Great film."])["input_ids"][0].tolist()
    assert ids == plain("Review Heat.\nGreat film.")["input_ids"]
