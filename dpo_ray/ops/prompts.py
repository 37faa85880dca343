"""The user's prompts, validated and split once into train and held-out prompts (`schemas.PROMPTS`)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Mapping

import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import InputError
from dpo_ray.inputs import read_prompts, write_rejects

log = logging.getLogger(__name__)


def prepare_prompts(cfg: PipelineConfig, out_dir: str | Path) -> dict:
    """Validate the user's prompts and write prompts.parquet with a train/eval split seeded by cfg.held_out_seed."""
    data = cfg.data
    read = read_prompts(data.prompts, data.on_bad_rows, split=data.split, columns=data.columns)
    write_rejects(read.rejects, out_dir)
    if not read.rows:
        raise InputError(f"data.prompts: no usable prompt in {data.prompts} ({len(read.rejects)} row(s) rejected)")
    rows = sorted(read.rows, key=lambda r: r["id"])
    random.Random(cfg.held_out_seed).shuffle(rows)
    n_eval = min(data.num_eval_prompts, len(rows) // 2)
    if data.num_eval_prompts and n_eval == 0:
        raise InputError(f"data.num_eval_prompts: the {len(rows)} prompt in {data.prompts} cannot be split into "
                         "train and held-out prompts; give at least 2")
    if n_eval < data.num_eval_prompts:
        log.info(f"sample: {len(rows)} prompts: {n_eval} held out for evaluation, not "
                 f"data.num_eval_prompts={data.num_eval_prompts} (at most half are held out)")
    rest = rows[n_eval:]
    if cfg.run.seed != cfg.held_out_seed:
        # A later round: the same held-out prompts, and its own draw of train prompts from the others.
        random.Random(cfg.run.seed).shuffle(rest)
    train = rest[: data.num_train_prompts]
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


def held_out_prompts(cfg: PipelineConfig, sources: Mapping[str, Path], out: Path) -> Path:
    """The `prompts` source of a stage (the sample stage's prompts.parquet), or without one (an offline run) the
    prompts split from data.prompts into `out` as the sample stage would."""
    if "prompts" in sources:
        return sources["prompts"]
    prepare_prompts(cfg, out)
    return out / "prompts.parquet"
