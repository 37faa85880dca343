"""How much memory one training worker needs, per strategy, before anything is loaded (`dpo-ray plan`).

The estimate is arithmetic on the model's shape (read from its config, built on PyTorch's meta device, so no
weight is loaded) and on the train config. Per worker, in bytes:

    weights      params x p          (ZeRO-3: / workers, plus the layers gathered for the current module;
                                      QLoRA: the decoder layers' in NF4, 0.5625 bytes, the rest in fp32)
    gradients    trainable x p       (DDP across workers: x2 for its all-reduce buckets; ZeRO: / workers, plus
                                      DeepSpeed's reduce bucket of reduce_bucket_size elements)
    optimizer    trainable x s       (DDP: AdamW's two states in the weights' dtype, s = 2p; ZeRO: an fp32
                                      master copy and two fp32 states, s = 12, / workers; offload: in CPU memory)
    activations  what autograd keeps between forward and backward for one micro-batch (below)
    transient    the fp32 gradient of the scored logits, alive at the start of the backward

with p the bytes of the model's dtype. Activations, for a Llama-style decoder (hidden h, MLP width i, n heads of
size d, L layers, vocabulary V) and a micro-batch of B pairs with prompts of Lp and completions of Lc tokens,
run as the train stage runs them (each prompt once, its KV cache shared by chosen and rejected):

    executed tokens  T = B*Lp + 2*B*Lc
    per layer        T * (6h + 4nd + 4i) * p       norms' inputs and outputs, q/k/v/attention output (keys
                                                   and values repeated to every head), the MLP's four
                     + 2*B*Lp * 2nd * p            each completion's attention keeps the prompt's keys/values
    once             T * 2d * p                    the rotary cos/sin tables the layers share
    LM head          2*B*Lc * V * 4                the scored positions' fp32 logits (the log-softmax keeps them)
                     + (2*B*Lc + 2T) * h * p       their hidden states; the final norm's input and output
                                                   (a frozen norm, under LoRA, keeps neither)

Under LoRA the frozen norms keep less (4h instead of 6h) and each adapted module keeps its rank-r projection;
LoRA dropout adds a copy of every adapted module's input and its mask. Under gradient checkpointing each layer
keeps only its input, one layer is recomputed at a time, and prompts are not shared (the KV cache is off):
T = 2*B*(Lp+Lc). The coefficients were counted with autograd's saved-tensor hooks on SmolLM2 and are checked on
the test model (tests/test_memory_plan.py); the totals against measured peaks in benchmarks/memory_savers.py.
Not counted: the framework itself (CUDA context and kernel workspaces on a GPU, a few hundred MiB; libraries on
a CPU), allocator fragmentation, and anything sampling or evaluation hold.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from dpo_ray.config import LoraSettings, PipelineConfig
from dpo_ray.errors import ModelError

GIB = 2**30
# DeepSpeed's defaults for what we leave unset (deepspeed/runtime/zero/config.py).
_REDUCE_BUCKET_ELEMENTS = 500_000_000
# bf16-mixed: float32 weights, gradients and optimizer; its bf16 activations are counted as float32 (an upper bound).
_DTYPE_BYTES = {"float32": 4, "bf16-mixed": 4, "bfloat16": 2, "float16": 2}
_NF4_BYTES = 0.5 + 4 / 64


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    # The largest decoder layer's parameters (what ZeRO-3 gathers at a time).
    layer_params: int
    # Under the LoRA settings given (zero without): trainable adapter parameters, adapted modules per layer and
    # the sum of their input widths per layer.
    lora_params: int = 0
    lora_modules: int = 0
    lora_inputs: int = 0


def model_shape(model_dir: str, lora: LoraSettings | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the causal LM in `model_dir` (a resolved local folder or hub id), built without weights."""
    from dpo_ray.models import skip_unused_imports

    skip_unused_imports()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    missing = [name for name in needed if getattr(config, name, None) is None]
    if missing:
        raise ModelError(f"plan: the activation estimate covers Llama-style decoders; {model_dir} "
                         f"({config.model_type}) has no {', '.join(missing)} in its config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = model.get_decoder().layers
    shape = dict(
        params=sum(p.numel() for p in model.parameters()), layers=config.num_hidden_layers,
        hidden=config.hidden_size, intermediate=config.intermediate_size, heads=config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        vocab=config.vocab_size, layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers))
    if lora:
        from dpo_ray.models import with_lora
        from peft.tuners.lora import LoraLayer

        adapted = with_lora(model, lora, model_dir)
        modules = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
        shape.update(lora_params=sum(p.numel() for p in adapted.parameters() if p.requires_grad),
                     lora_modules=len(modules) // config.num_hidden_layers,
                     lora_inputs=sum(m.in_features for m in modules) // config.num_hidden_layers)
    return ModelShape(**shape)


@dataclass(frozen=True)
class Setting:
    strategy: str  # "ddp", "zero2" or "zero3"
    lora: bool = False
    checkpointing: bool = False
    offload: bool = False
    # QLoRA (train.lora.quantize=nf4): LoRA on a 4-bit base; DDP only.
    quantized: bool = False

    @property
    def name(self) -> str:
        extras = [n for n, on in (("QLoRA" if self.quantized else "LoRA", self.lora),
                                  ("checkpointing", self.checkpointing), ("offload", self.offload)) if on]
        return " + ".join([{"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[self.strategy], *extras])


@dataclass(frozen=True)
class Estimate:
    """Bytes per worker; `cpu_optimizer` is what offload moves to CPU memory (not in `total`)."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    cpu_optimizer: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient


class Activations(NamedTuple):
    """Bytes of one micro-batch: `kept` from forward to backward, `recomputed` (one checkpointed layer's, alive
    while the backward recomputes it), and the fp32 gradient of the scored logits (`logits_grad`)."""
    kept: int
    recomputed: int
    logits_grad: int


def activation_bytes(shape: ModelShape, pairs: int, prompt_tokens: int, completion_tokens: int, dtype_bytes: int,
                     lora: LoraSettings | None, checkpointing: bool) -> Activations:
    h, i, nd, p = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, dtype_bytes
    per_token = ((4 if lora else 6) * h + 4 * nd + 4 * i) * p  # bytes per executed token and layer
    if lora:
        per_token += shape.lora_modules * lora.r * p
        if lora.dropout:
            # The dropped input and its one-byte mask, per adapted module.
            per_token += shape.lora_inputs * (p + 1)
    scored = 2 * pairs * completion_tokens
    logits = scored * shape.vocab * 4
    # The scored positions' hidden states and fp32 logits, and (its weight training) the final norm's input and
    # output at every position.
    head = lambda tokens: logits + (scored + (0 if lora else 2) * tokens) * h * p  # noqa: E731
    if checkpointing:
        tokens = 2 * pairs * (prompt_tokens + completion_tokens)
        return Activations(tokens * h * p * shape.layers + head(tokens), tokens * per_token, logits)
    tokens = pairs * prompt_tokens + scored
    shared_prompt = 2 * pairs * prompt_tokens * 2 * nd * p
    rotary_tables = tokens * 2 * shape.head_dim * p  # cos and sin, shared by the layers
    return Activations((tokens * per_token + shared_prompt) * shape.layers + head(tokens) + rotary_tables, 0,
                       logits)


def estimate(shape: ModelShape, setting: Setting, dtype: str, workers: int, pairs: int, prompt_tokens: int,
             completion_tokens: int, lora: LoraSettings | None = None, optimizer_states: int = 2) -> Estimate:
    """Per-worker memory of `setting` (the formulas are in the module docstring); `lora` shapes the adapter when
    setting.lora (default LoraSettings()); `optimizer_states`: 2 for AdamW, 1 for RMSprop."""
    p = _DTYPE_BYTES[dtype]
    lora = (lora or LoraSettings()) if setting.lora else None
    trainable = shape.lora_params if lora else shape.params
    if lora and not shape.lora_params:
        raise ValueError("estimate: the shape was built without LoRA settings")
    kept, recomputed, transient = activation_bytes(shape, pairs, prompt_tokens, completion_tokens, p, lora,
                                                   setting.checkpointing)
    activations = kept + recomputed
    if setting.quantized:
        # The decoder layers' weights in NF4 (half a byte, plus an fp32 scale per 64-weight block); peft's k-bit
        # preparation keeps every other weight, and so the adapter, its gradients and AdamW states, in fp32.
        quantized = shape.layers * shape.layer_params
        weights = int(quantized * _NF4_BYTES) + (shape.params - quantized + trainable) * 4
        return Estimate(weights=weights, gradients=trainable * 4 * (2 if workers > 1 else 1),
                        optimizer=trainable * 4 * optimizer_states, activations=activations, transient=transient)
    if setting.strategy == "ddp":
        return Estimate(weights=(shape.params + (trainable if lora else 0)) * p,
                        gradients=trainable * p * (2 if workers > 1 else 1), optimizer=trainable * p * optimizer_states,
                        activations=activations, transient=transient)
    # ZeRO: fp32 master weights plus fp32 states, partitioned across the workers.
    optimizer = trainable * (4 + 4 * optimizer_states) // workers
    bucket = min(_REDUCE_BUCKET_ELEMENTS, trainable) * p
    weights = (shape.params + (trainable if lora else 0)) * p
    if setting.strategy == "zero3":
        weights = weights // workers + 2 * shape.layer_params * p  # the current layer and the prefetched one
    return Estimate(weights=weights, gradients=trainable * p // workers + bucket,
                    optimizer=0 if setting.offload else optimizer, activations=activations, transient=transient,
                    cpu_optimizer=optimizer if setting.offload else 0)


def settings_grid() -> list[Setting]:
    grid = []
    for strategy in ("ddp", "zero2", "zero3"):
        for offload in ((False,) if strategy == "ddp" else (False, True)):
            for lora, quantized in ((False, False), (True, False)) + (((True, True),) if strategy == "ddp" else ()):
                for checkpointing in (False, True):
                    grid.append(Setting(strategy, lora, checkpointing, offload, quantized))
    return grid


def configured_setting(cfg: PipelineConfig) -> Setting:
    t = cfg.train
    return Setting("ddp" if t.strategy == "ddp" else f"zero{t.zero_stage}", t.lora is not None,
                   t.gradient_checkpointing, t.offload_optimizer, bool(t.lora and t.lora.quantize))


def plan(cfg: PipelineConfig, shape: ModelShape, workers: int) -> list[tuple[Setting, Estimate]]:
    """Every setting of the grid for the config's model, dtype, micro-batch and token limits."""
    t, d = cfg.train, cfg.data
    return [(s, estimate(shape, s, cfg.model.dtype, workers, t.micro_batch_size, d.max_prompt_tokens,
                         d.max_completion_tokens, t.lora, 1 if t.optimizer == "rmsprop" else 2))
            for s in settings_grid()]


def render(rows: list[tuple[Setting, Estimate]], configured: Setting, device_memory: int | None) -> str:
    """The plan as a Markdown table in GiB, the configured setting marked, and whether each fits."""
    parts = [f.name for f in fields(Estimate) if f.name != "cpu_optimizer"]
    head = ["setting", *parts, "total", "CPU (offload)"] + (["fits"] if device_memory else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, est in rows:
        cells = [setting.name + (" (configured)" if setting == configured else ""),
                 *(f"{getattr(est, part) / GIB:.2f}" for part in parts), f"{est.total / GIB:.2f}",
                 f"{est.cpu_optimizer / GIB:.2f}" if est.cpu_optimizer else "-"]
        if device_memory:
            cells.append("yes" if est.total <= device_memory else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
