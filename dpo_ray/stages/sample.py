"""sample: the user's prompts split into train and held-out, then n on-policy completions per train prompt.

Writes `prompts.parquet` (schemas.PROMPTS), `completions/` (schemas.COMPLETIONS) and rejected prompt rows, if any.
The samplers (transformers or vLLM actors) are in `ops/samplers.py`.
"""

from __future__ import annotations


import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray import keys, schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.ops.prompts import prepare_prompts, read_split
from dpo_ray.ops.samplers import sample_dataset
from dpo_ray.runner import StageContext

SOURCES: dict[str, bool] = {}


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    return {**keys.policy(cfg), "prompts": keys.digest(cfg.data.prompts, "data.prompts"),
            "data": keys.settings(cfg, "data"), "sample": cfg.sample.model_dump()}


def run(ctx: StageContext) -> dict:
    """Prepare the prompts, then sample cfg.sample.n completions for every train prompt."""
    cfg, s = ctx.cfg, ctx.cfg.sample
    stats = prepare_prompts(cfg, ctx.out)
    completions_dir = str(ctx.out / "completions")
    sample_dataset(read_split(ctx.out / "prompts.parquet", "train"), cfg, cfg.model.policy,
                   s.n, s.max_new_tokens, s.temperature, cfg.run.seed).write_parquet(completions_dir)
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
