"""The memory plan (dpo_ray/memory_plan.py): its activation estimate against what autograd really keeps, its
parameter counts against the real model, the ZeRO arithmetic by hand, and the README's `dpo-ray plan` command."""

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PAD_ID, VOCAB, doc_command, isolated_env

from dpo_ray.config import LoraSettings, TrainConfig
from dpo_ray.logprobs import SequenceScorer
from dpo_ray.memory_plan import ModelShape, Setting, activation_bytes, estimate, model_shape
from dpo_ray.models import tiny_llama, with_lora
from dpo_ray.stages.train import dpo_forward

REPO = Path(__file__).resolve().parent.parent
PAIRS, PROMPT_TOKENS, COMPLETION_TOKENS = 4, 12, 9


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A two-layer Llama wide enough that the per-token terms dominate, saved as a model folder."""
    folder = tmp_path_factory.mktemp("plan-model")
    tiny_llama(VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID, hidden_size=64, intermediate_size=160,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128).save_pretrained(folder)
    return str(folder)


def _saved_activation_bytes(model, t: TrainConfig) -> int:
    """Bytes of the tensors autograd keeps for the backward in one train forward, the parameters left out (each
    storage once)."""
    generator = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    rows = {"prompt_ids": [tokens(PROMPT_TOKENS) for _ in range(PAIRS)],
            "chosen_ids": [tokens(COMPLETION_TOKENS) for _ in range(PAIRS)],
            "rejected_ids": [tokens(COMPLETION_TOKENS) for _ in range(PAIRS)],
            "ref_chosen_logps": [-20.0] * PAIRS, "ref_rejected_logps": [-21.0] * PAIRS}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        dpo_forward(SequenceScorer(model).train(), rows, PAD_ID, t)
    return sum(kept.values())


VARIANTS = {"full": {}, "lora": {"lora": LoraSettings(r=4, alpha=8)},
            "lora with dropout": {"lora": LoraSettings(r=4, alpha=8, dropout=0.1)},
            "checkpointing": {"gradient_checkpointing": True}}


def _model(model_dir: str, t: TrainConfig):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if t.lora:
        model = with_lora(model, t.lora, model_dir)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_estimate_matches_what_autograd_keeps(model_dir, variant):
    t = TrainConfig(**VARIANTS[variant])
    measured = _saved_activation_bytes(_model(model_dir, t), t)
    # Autograd's hooks do not see inside a checkpointed layer, so `kept` (without the layer being recomputed) is
    # what they measure.
    kept = activation_bytes(model_shape(model_dir, t.lora), PAIRS, PROMPT_TOKENS, COMPLETION_TOKENS, 4, t.lora,
                            t.gradient_checkpointing).kept
    assert kept == pytest.approx(measured, rel=0.05), (variant, kept, measured)


def test_parameter_counts_are_the_models(model_dir):
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    shape = model_shape(model_dir, lora)
    t = TrainConfig(lora=lora)
    adapted = _model(model_dir, t)
    assert shape.lora_params == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert shape.params == sum(p.numel() for p in _model(model_dir, TrainConfig()).parameters())
    assert (shape.lora_modules, shape.lora_inputs) == (2, 64 + 64)


SHAPE = ModelShape(params=1000, layers=2, hidden=8, intermediate=16, heads=2, head_dim=4, vocab=10,
                   layer_params=400, lora_params=50, lora_modules=7, lora_inputs=64)


def test_strategies_by_hand():
    def est(strategy, workers=4, dtype="bfloat16", **options):
        return estimate(SHAPE, Setting(strategy, **options), dtype, workers, 1, 4, 4)

    ddp = est("ddp")
    # bf16 weights, gradients twice (DDP's buckets), AdamW's two bf16 states.
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (2000, 4000, 4000)
    assert est("ddp", workers=1).gradients == 2000
    zero2 = est("zero2")
    # fp32 master + two fp32 states = 12 bytes per weight, over 4 workers; the gradient shard plus a reduce bucket
    # (capped here by the model's 1000 weights).
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == (2000, 500 + 2000, 3000)
    offloaded = est("zero2", offload=True)
    assert (offloaded.optimizer, offloaded.cpu_optimizer) == (0, 3000)
    # ZeRO-3: the weight shard plus the current and the prefetched layer.
    assert est("zero3").weights == 500 + 2 * 400 * 2
    lora = est("zero2", lora=True)
    assert (lora.weights, lora.optimizer) == ((1000 + 50) * 2, 50 * 12 // 4)
    qlora = est("ddp", lora=True, quantized=True)
    # The two layers' 800 weights in NF4, the other 200 and the adapter's 50 in fp32 (peft's k-bit preparation).
    assert (qlora.weights, qlora.gradients, qlora.optimizer) == (int(800 * 0.5625) + 250 * 4, 50 * 4 * 2, 50 * 8)
    # fp32 AdamW under DDP: 4 + 4 + 8 bytes per weight, plus activations.
    one = estimate(SHAPE, Setting("ddp"), "float32", 1, 1, 4, 4)
    assert one.total == 16 * 1000 + one.activations + one.transient
    assert est("ddp", checkpointing=True).activations < ddp.activations


@pytest.mark.slow
def test_readme_plan_command():
    """The README's `dpo-ray plan` line as written: a Llama-3-8B config (no weights) in bf16 on eight 80 GiB GPUs."""
    command = doc_command(REPO / "README.md", ".venv/bin/dpo-ray plan")
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=isolated_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| ").removesuffix(" (configured)"): line.split(" | ")
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| setting")}
    assert len(rows) == 22
    assert "8030.3M parameters" in done.stdout
    # Full fine-tuning of 8B under plain DDP does not fit an 80 GiB GPU; ZeRO-3 over eight does.
    assert rows["DDP"][-1].strip(" |") == "no" and rows["ZeRO-3"][-1].strip(" |") == "yes"
    # ZeRO-3 shards the 15 GiB of bf16 weights eight ways (plus two gathered layers).
    assert float(rows["ZeRO-3"][1]) < float(rows["ZeRO-2"][1]) / 4
