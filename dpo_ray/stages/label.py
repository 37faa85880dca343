"""label: score completions and turn them into chosen/rejected pairs; or import existing preference data.

Labelers (all append a `reward` column to a Ray dataset of completions):
- `sentiment`: VADER compound sentiment of the completion, in [-1, 1] (positive is better);
- `reward_model`: any local AutoModelForSequenceClassification folder with a single output;
- `implicit`: the DPO implicit reward beta*log(pi/pi_ref) of a given policy and reference (self-labeling).
`label.filter_labeler` scores every completion a second time with an external reward (`filter_reward`) and keeps
only the pairs it does not contradict: implicit self-labels filtered by sentiment are then a config choice.

Outputs: `scored/` (schemas.SCORED, every completion with its reward) and `pairs/` (schemas.PAIRS).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col
import torch

from dpo_ray import schemas
from dpo_ray.config import LabelConfig, PipelineConfig
from dpo_ray.errors import InputError
from dpo_ray.inputs import Reject, read_preferences, write_rejects
from dpo_ray.models import ModelError, device_for, load_tokenizer, resolve_model, set_torch_threads
from dpo_ray.pairs import PairStats, build_pairs
from dpo_ray.stages.reference import completion_logps_column
from dpo_ray.text import TokenizationError, completion_token_ids, prompt_token_ids


class SentimentScorer:
    def __init__(self, column: str = "reward"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = [self.analyzer.polarity_scores(text)["compound"] for text in batch["completion"].to_pylist()]
        return batch.append_column(self.column, pa.array(scores, pa.float64()))


class RewardModelScorer:
    def __init__(self, cfg: dict, path: str, column: str = "reward"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.column = column
        self.cfg = PipelineConfig.model_validate(cfg)
        set_torch_threads(self.cfg.run.torch_threads)
        trust = self.cfg.model.trust_remote_code
        local = resolve_model(path)
        self.device = device_for(ray.get_gpu_ids())
        self.model = AutoModelForSequenceClassification.from_pretrained(
            local, trust_remote_code=trust, use_safetensors=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _render(self, prompt: str, completion: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return f"{prompt}\n{completion}"

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [self._render(p, c) for p, c in zip(batch["prompt"].to_pylist(), batch["completion"].to_pylist())]
        scores = []
        size = self.cfg.label.batch_size
        for start in range(0, len(texts), size):
            enc = self.tokenizer(texts[start : start + size], padding=True, truncation=True,
                                 return_tensors="pt").to(self.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return batch.append_column(self.column, pa.array(scores, pa.float64()))


def check_labeler(cfg: PipelineConfig, labeler: str | None) -> None:
    """Fail in the driver before a stage reads or generates anything, not in an actor later: a missing reward
    model folder or a head that does not give one score per sequence (a 2-class sentiment classifier, say)."""
    if labeler != "reward_model":
        return
    from transformers import AutoConfig

    path = cfg.label.reward_model
    config = AutoConfig.from_pretrained(resolve_model(path), trust_remote_code=cfg.model.trust_remote_code)
    if config.num_labels != 1:
        raise ModelError(f"label.reward_model: {path} has a {config.num_labels}-output head; a reward model "
                         "needs a single-score head (num_labels=1)")


def add_rewards(ds: ray.data.Dataset, cfg: PipelineConfig, labeler: str | None = None,
                sampled_by: str | None = None, column: str = "reward") -> ray.data.Dataset:
    """Append a `column` of rewards to a dataset with prompt/completion text and prompt_ids/completion_ids.

    `sampled_by`: the model whose `sample_logp` every row carries, if one did; the implicit labeler then takes
    that model's log-probs from the sampler instead of scoring them again where they are exact.
    """
    lab = cfg.label
    labeler = labeler or lab.labeler
    if labeler == "sentiment":
        return ds.map_batches(SentimentScorer, fn_constructor_kwargs={"column": column}, batch_format="pyarrow",
                              batch_size=lab.batch_size,
                              compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    if labeler == "reward_model":
        return ds.map_batches(
            RewardModelScorer,
            fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "path": lab.reward_model, "column": column},
            batch_format="pyarrow", batch_size=lab.batch_size * 4,
            compute=ray.data.ActorPoolStrategy(size=cfg.reference.num_actors), **cfg.reference.actor_resources(),
        )
    policy = lab.implicit_policy or cfg.model.policy
    reference = lab.implicit_reference or cfg.reference_model
    ds = completion_logps_column(ds, cfg, policy, "_implicit_policy_logp", sampled_by)
    ds = completion_logps_column(ds, cfg, reference, "_implicit_reference_logp", sampled_by)
    beta = lab.implicit_beta

    def implicit_reward(batch: pa.Table) -> pa.Table:
        diff = pc.subtract(batch["_implicit_policy_logp"], batch["_implicit_reference_logp"])
        batch = batch.drop_columns(["_implicit_policy_logp", "_implicit_reference_logp"])
        return batch.append_column(column, pc.multiply(diff, beta))

    return ds.map_batches(implicit_reward, batch_format="pyarrow")


def _group_pairs(group: pa.Table, lab: LabelConfig) -> tuple[list[dict], PairStats]:
    rows = sorted(group.to_pylist(), key=lambda r: r["sample_index"])
    index_pairs, stats = build_pairs(
        [r["completion"] for r in rows], [r["reward"] for r in rows], lab.pairing, lab.min_margin,
        [r["filter_reward"] for r in rows] if lab.filter_labeler else None, lab.filter_min_margin)
    pairs = []
    for c, r in index_pairs:
        chosen, rejected = rows[c], rows[r]
        pairs.append({
            "pair_id": f"{chosen['prompt_id']}:{chosen['sample_index']}>{rejected['sample_index']}",
            "prompt_id": chosen["prompt_id"], "prompt": chosen["prompt"], "prompt_ids": chosen["prompt_ids"],
            "chosen": chosen["completion"], "chosen_ids": chosen["completion_ids"],
            "rejected": rejected["completion"], "rejected_ids": rejected["completion_ids"],
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
        })
    return pairs, stats


_STAT_FIELDS = list(PairStats().as_dict())
# Pairing output carries each prompt's counts on its first row (a prompt without pairs emits one row with a
# null pair_id), so one shuffle yields both the pairs and the statistics of what was dropped.
_PAIRING = schemas.PAIRS
for _name in _STAT_FIELDS:
    _PAIRING = _PAIRING.append(pa.field(f"stat_{_name}", pa.int64()))


def _pairs_with_stats(group: pa.Table, label_cfg: dict) -> pa.Table:
    pairs, stats = _group_pairs(group, LabelConfig.model_validate(label_cfg))
    if not pairs:
        pairs = [{name: None for name in schemas.PAIRS.names}]
    counts = stats.as_dict()
    for i, row in enumerate(pairs):
        row.update({f"stat_{k}": (v if i == 0 else 0) for k, v in counts.items()})
    return schemas.rows_to_table(pairs, _PAIRING)


def _no_filter_reward(batch: pa.Table) -> pa.Table:
    return batch.append_column("filter_reward", pa.nulls(batch.num_rows, pa.float64()))


def run(cfg: PipelineConfig, completions_path: str, out_dir: str, sampled_by: str | None = None) -> dict:
    """Score completions and pair them; `sampled_by` names the model that sampled them, when the caller knows."""
    out = Path(out_dir)
    check_labeler(cfg, cfg.label.labeler)
    check_labeler(cfg, cfg.label.filter_labeler)
    scored = add_rewards(ray.data.read_parquet(completions_path), cfg, sampled_by=sampled_by)
    if cfg.label.filter_labeler:
        # Materialized first, so only one scorer's actor pool holds CPUs at a time: two pools in one streaming
        # pipeline can take the CPUs its read tasks need and wait on each other forever (seen on 2 CPUs).
        scored = add_rewards(scored.materialize(), cfg, cfg.label.filter_labeler, column="filter_reward")
    else:
        scored = scored.map_batches(_no_filter_reward, batch_format="pyarrow")
    scored.write_parquet(str(out / "scored"))
    # A few partitions: the default (200) costs a minute of task overhead on a small node.
    partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
    paired = (
        ray.data.read_parquet(str(out / "scored"))
        .groupby("prompt_id", num_partitions=partitions)
        .map_groups(_pairs_with_stats, fn_args=(cfg.label.model_dump(mode="json"),), batch_format="pyarrow")
        .materialize()
    )
    # Summed while streaming the few stat columns through the driver: Ray's own `sum` would plan another
    # shuffle, about 10 s of overhead for a handful of integers.
    stats = dict.fromkeys(_STAT_FIELDS, 0)
    for batch in paired.select_columns([f"stat_{name}" for name in _STAT_FIELDS]).iter_batches(batch_format="pyarrow"):
        for name in _STAT_FIELDS:
            stats[name] += pc.sum(batch[f"stat_{name}"]).as_py() or 0
    if stats["pairs"] == 0:
        raise InputError(f"label: no preference pairs from {stats['completions']} completions "
                         f"({json.dumps(stats)}); sample more (sample.n, data.num_train_prompts) or lower label.min_margin")
    paired.filter(expr=col("pair_id").is_not_null()).select_columns(schemas.PAIRS.names).write_parquet(str(out / "pairs"))
    return stats


def import_preferences(cfg: PipelineConfig, out_dir: str) -> dict:
    """Offline DPO: existing prompt/chosen/rejected data, tokenized as the policy's tokenizer sees it."""
    data = cfg.data
    read = read_preferences(data.preferences, data.on_bad_rows)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    rows, rejects, truncated_prompts, truncated_completions = [], list(read.rejects), 0, 0
    for rec in read.rows:
        field = "prompt"
        try:
            prompt_ids, cut = prompt_token_ids(tokenizer, rec["prompt"], rec["messages_json"], data.system_prompt,
                                               data.max_prompt_tokens, data.prompt_truncation)
            full = {}
            for field in ("chosen", "rejected"):
                full[field] = completion_token_ids(tokenizer, rec["prompt"], rec["messages_json"],
                                                   data.system_prompt, rec[field])
            sides = {side: ids[: data.max_completion_tokens] for side, ids in full.items()}
        except TokenizationError as err:
            if data.on_bad_rows == "error":
                raise TokenizationError(f"{data.preferences}: row {rec['row']}: field {field}: {err}") from None
            rejects.append(Reject(data.preferences, rec["row"], field, str(err), json.dumps(rec)))
            continue
        if sides["chosen"] == sides["rejected"]:
            problem = "chosen and rejected tokenize identically (after truncation)"
            if data.on_bad_rows == "error":
                raise TokenizationError(f"{data.preferences}: row {rec['row']}: field rejected: {problem}")
            rejects.append(Reject(data.preferences, rec["row"], "rejected", problem, json.dumps(rec)))
            continue
        truncated_prompts += cut
        truncated_completions += sum(len(ids) > data.max_completion_tokens for ids in full.values())
        rows.append({
            "pair_id": rec["id"], "prompt_id": rec["id"], "prompt": rec["prompt"], "prompt_ids": prompt_ids,
            "chosen": rec["chosen"], "chosen_ids": sides["chosen"],
            "rejected": rec["rejected"], "rejected_ids": sides["rejected"],
            "chosen_reward": None, "rejected_reward": None,
        })
    if not rows:
        raise InputError(f"label: no usable pairs in {data.preferences}: all {len(rejects)} rows were rejected "
                         "(data.on_bad_rows=error stops at the first, naming its row and field)")
    out = Path(out_dir)
    (out / "pairs").mkdir(parents=True)
    pq.write_table(schemas.rows_to_table(rows, schemas.PAIRS), out / "pairs" / "part-0.parquet")
    write_rejects(rejects, out)
    return {"pairs": len(rows), "rejected_rows": len(rejects), "prompts_truncated": truncated_prompts,
            "completions_truncated": truncated_completions}


def main(argv: list[str] | None = None) -> None:
    from dpo_ray.cli import stage_entry

    stage_entry("label", argv)


if __name__ == "__main__":
    main()
