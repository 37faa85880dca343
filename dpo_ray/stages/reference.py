"""reference: one offline pass scoring every pair under the reference model, so training never holds one.

Writes `schemas.REFERENCE`: the pairs plus `ref_chosen_logps` and `ref_rejected_logps`, each the reference
model's log-prob summed over completion tokens only. The scorer below is the same code path training uses
(`logprobs.completion_logps`); the label and evaluate stages reuse it to score completions under any model.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.logprobs import shared_prompt_batch, shared_prompt_logps
from dpo_ray.models import load_causal_lm, load_tokenizer, set_torch_threads
from dpo_ray.stages.sample import sample_logp_is_exact


class LogProbScorer:
    """Ray Data callable: appends, for each (token-id column -> output column), the summed completion log-prob
    of `prompt_ids` + that column under one model. A row's completions share one prompt forward (its KV cache);
    rows are length-sorted into forward batches to cut padding."""

    def __init__(self, cfg: dict, model_spec: str, columns: dict[str, str]):
        self.cfg = PipelineConfig.model_validate(cfg)
        set_torch_threads(self.cfg.run.torch_threads)
        self.columns = columns
        self.model = load_causal_lm(model_spec, self.cfg.model.dtype,
                                    trust_remote_code=self.cfg.model.trust_remote_code).eval()
        self.pad_id = load_tokenizer(model_spec, self.cfg.model.trust_remote_code).pad_token_id

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch["prompt_ids"].to_pylist()
        completions = list(zip(*(batch[col].to_pylist() for col in self.columns)))
        order = sorted(range(batch.num_rows), key=lambda r: len(prompts[r]) + max(map(len, completions[r])))
        results = [[math.nan] * len(self.columns) for _ in range(batch.num_rows)]
        size = self.cfg.reference.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            tensors = shared_prompt_batch([prompts[r] for r in rows], [completions[r] for r in rows], self.pad_id)
            sums, _ = shared_prompt_logps(self.model, **tensors)
            for i, r in enumerate(rows):
                results[r] = sums[i * len(self.columns) : (i + 1) * len(self.columns)].tolist()
        for index, out in enumerate(self.columns.values()):
            batch = batch.append_column(out, pa.array([r[index] for r in results], pa.float64()))
        return batch


def score_logps(ds: ray.data.Dataset, cfg: PipelineConfig, model_spec: str, columns: dict[str, str]) -> ray.data.Dataset:
    r = cfg.reference
    return ds.map_batches(
        LogProbScorer,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "model_spec": model_spec, "columns": columns},
        batch_size=max(r.batch_size * 4, 16),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=r.num_actors),
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor,
    )


def completion_logps_column(ds: ray.data.Dataset, cfg: PipelineConfig, model_spec: str, column: str,
                            sampled_by: str | None = None) -> ray.data.Dataset:
    """`ds` with `column` = model_spec's summed log-prob of each row's completion_ids. When model_spec sampled
    the rows (`sampled_by`) and the sampler's log-prob is exact, it is taken from sample_logp, not recomputed."""
    if sampled_by == model_spec and sample_logp_is_exact(cfg):
        return ds.map_batches(lambda b: b.append_column(column, b["sample_logp"]), batch_format="pyarrow")
    return score_logps(ds, cfg, model_spec, {"completion_ids": column}).materialize()


def run(cfg: PipelineConfig, pairs_path: str, out_dir: str) -> dict:
    pairs = ray.data.read_parquet(pairs_path)
    scored = score_logps(pairs, cfg, cfg.reference_model,
                         {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"})
    scored.write_parquet(out_dir)
    table = schemas.read_table(out_dir, schemas.REFERENCE, ["ref_chosen_logps", "ref_rejected_logps"])
    finite = pc.and_(pc.is_finite(table["ref_chosen_logps"]), pc.is_finite(table["ref_rejected_logps"]))
    return {"pairs": table.num_rows, "nonfinite_pairs": table.num_rows - (pc.sum(finite).as_py() or 0)}


def main(argv: list[str] | None = None) -> None:
    from dpo_ray.cli import stage_main

    stage_main("reference", argv)


if __name__ == "__main__":
    main()
