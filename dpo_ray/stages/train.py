"""train: Ray Train minimizes the DPO loss family on pairs with precomputed reference log-probs.

The distributed layer is thin: `TorchTrainer` starts the workers, each reads its shard of the reference
Parquet as a Ray dataset, and the engines of `dpo_ray.engines` (torch DDP, DeepSpeed ZeRO-2/3) hide the one
difference between strategies: how gradients are reduced, stepped and checkpointed. No reference model is ever
loaded here. Rerunning with the same inputs resumes from the last checkpoint (same Ray Train name and path).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dpo_ray.config import PipelineConfig, TrainConfig
from dpo_ray.engines import POLICY_DIR, DDPEngine, DeepSpeedEngine
from dpo_ray.errors import ConfigError, TrainingError
from dpo_ray.logprobs import SequenceScorer, shared_prompt_batch
from dpo_ray.losses import DPOOutput, dpo_objective, reward_metrics
from dpo_ray.models import load_causal_lm, load_tokenizer, set_torch_threads

class NonFiniteError(TrainingError):
    pass


_ORDER_KEY = "_order"
# Rows per block of the training dataset (token ids, a few KiB a pair): small enough to stream to a worker.
_PAIRS_PER_BLOCK = 1024


def with_order_key(batch: pa.Table, seed: int) -> pa.Table:
    """`batch` plus a sort key per pair: a hash of its pair_id and the seed. Pairs sorted by it come in one
    pseudo-random order that depends on the seed and the pairs, not on how Parquet files and blocks hold them."""
    salt = seed.to_bytes(8, "little", signed=True)
    keys = [int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8, salt=salt).digest(), "little")
            for pid in batch["pair_id"].to_pylist()]
    return batch.append_column(_ORDER_KEY, pa.array(keys, pa.uint64()))


def dpo_forward(model, rows: dict[str, list], pad_id: int, t: TrainConfig) -> tuple[DPOOutput, dict, int]:
    """One forward of B pairs and the DPO objective; `model` is a (wrapped) `SequenceScorer`.

    rows: prompt_ids, chosen_ids, rejected_ids (lists of B token lists); ref_chosen_logps, ref_rejected_logps (B).
    Each prompt runs once and both of its completions continue from its KV cache. Returns the loss output, the
    TRL-named metrics and the pair tokens (prompt+chosen and prompt+rejected, the prompt counted twice, as a
    trainer without prompt sharing would process them).
    """
    batch = shared_prompt_batch(rows["prompt_ids"], list(zip(rows["chosen_ids"], rows["rejected_ids"])), pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logps, counts = model(**batch)
    chosen, rejected = logps[0::2], logps[1::2]
    ref_chosen = torch.as_tensor(np.asarray(rows["ref_chosen_logps"], dtype=np.float32), device=device)
    ref_rejected = torch.as_tensor(np.asarray(rows["ref_rejected_logps"], dtype=np.float32), device=device)
    out = dpo_objective(chosen, rejected, ref_chosen, ref_rejected, counts[0::2], t.beta, t.loss,
                        t.label_smoothing, t.rpo_alpha)
    pair_tokens = 2 * int(batch["prompt_mask"].sum()) + int(batch["completion_mask"].sum())
    return out, reward_metrics(out, chosen, rejected), pair_tokens


def _lists(batch: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: [x.tolist() if isinstance(x, np.ndarray) else x for x in v] for k, v in batch.items()}


def _micro_batches(rows: dict[str, list], size: int) -> list[dict[str, list]]:
    """Split one step's rows into micro-batches of similar length, so padding costs little."""
    n = len(rows["prompt_ids"])
    order = sorted(range(n), key=lambda i: len(rows["prompt_ids"][i]) + max(len(rows["chosen_ids"][i]), len(rows["rejected_ids"][i])))
    return [{k: [v[i] for i in order[s : s + size]] for k, v in rows.items()} for s in range(0, n, size)]


def _zero_loss(model) -> torch.Tensor:
    # Backpropagated instead of a non-finite loss: keeps every rank's collectives in step, adds no gradient.
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    return tensor.cpu().tolist()


def _format_eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train_loop_per_worker(config: dict) -> None:
    cfg = PipelineConfig.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_torch_threads(cfg.run.torch_threads)
    torch.manual_seed(cfg.run.seed)
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(config["init_model"], cfg.model.trust_remote_code)
    scorer = SequenceScorer(load_causal_lm(config["init_model"], cfg.model.dtype, device, cfg.model.trust_remote_code))
    per_worker = t.batch_size // world
    accumulation = per_worker // t.micro_batch_size
    if t.strategy == "deepspeed":
        engine = DeepSpeedEngine(scorer, t, cfg.model.dtype, t.micro_batch_size, accumulation)
    else:
        engine = DDPEngine(scorer, t, world)
    engine.model.train()

    state = {"step": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0, "tokens": 0, "resumed_from": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            engine.load(Path(path))
            state = json.loads((Path(path) / "trainer_state.json").read_text())
        # Carried into every later checkpoint, so the stage's stats record each interruption it recovered from.
        state["resumed_from"] = [*state.get("resumed_from", []), state["step"]]
        if rank == 0:
            print(f"[train] resumed from step {state['step']}", flush=True)

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(config["tracking_uri"])

    steps_per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]
    shard = ray.train.get_dataset_shard("train")
    started, first_step = time.time(), state["step"]
    metrics: dict = {}
    for epoch in range(state["step"] // steps_per_epoch, t.epochs):
        batches = shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=per_worker * 4, local_shuffle_seed=cfg.run.seed + epoch)
        for index, raw in enumerate(batches):
            if index >= steps_per_epoch:
                break
            if epoch * steps_per_epoch + index < state["step"]:
                continue  # already trained before the resume
            step_start = time.time()
            totals: dict[str, float] = {}
            tokens, nonfinite_micro = 0, 0
            micro = _micro_batches(_lists(raw), t.micro_batch_size)
            for m, rows in enumerate(micro):
                with engine.no_sync(m < len(micro) - 1):
                    out, step_metrics, n_tokens = dpo_forward(engine.model, rows, tokenizer.pad_token_id, t)
                    weight = len(rows["prompt_ids"]) / per_worker
                    finite = _all_reduce([float(torch.isfinite(out.loss))], dist.ReduceOp.MIN)[0] > 0
                    engine.backward(out.loss * weight if finite else _zero_loss(engine.model))
                nonfinite_micro += not finite
                tokens += n_tokens
                for k, v in step_metrics.items():
                    totals[k] = totals.get(k, 0.0) + v * weight
            grad_norm, stepped = engine.step()
            ok = stepped and nonfinite_micro == 0
            state["step"] += 1
            state["nonfinite_steps"] += not ok
            state["nonfinite_in_a_row"] = 0 if ok else state["nonfinite_in_a_row"] + 1
            if state["nonfinite_in_a_row"] >= t.max_nonfinite_steps:
                raise NonFiniteError(
                    f"train: {state['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
                    f"(last at step {state['step']}); see train.max_nonfinite_steps"
                )
            reduced = _all_reduce([totals.get(k, float("nan")) for k in sorted(totals)] + [tokens])
            metrics = {k: v / world for k, v in zip(sorted(totals), reduced[:-1])}
            step_tokens = reduced[-1]
            state["tokens"] += step_tokens
            elapsed = time.time() - step_start
            metrics.update({
                "grad_norm": grad_norm, "learning_rate": engine.lr(), "tokens_per_s": step_tokens / elapsed,
                "pairs_per_s": t.batch_size / elapsed, "epoch": epoch, "nonfinite_steps": state["nonfinite_steps"],
            })
            if rank == 0:
                done = state["step"] - first_step
                eta = (time.time() - started) / done * (total_steps - state["step"])
                print(f"[train] step {state['step']}/{total_steps} loss {metrics['loss']:.4f} "
                      f"acc {metrics['rewards/accuracies']:.2f} margin {metrics['rewards/margins']:.3f} "
                      f"{metrics['tokens_per_s']:.0f} tok/s ETA {_format_eta(eta)}", flush=True)
                if tracker:
                    from mlflow.entities import Metric

                    now = int(time.time() * 1000)
                    tracker.log_batch(config["mlflow_run_id"], metrics=[
                        Metric(k, float(v), now, state["step"]) for k, v in metrics.items() if math.isfinite(v)])
            last = state["step"] == total_steps
            if last or state["step"] % t.checkpoint_every == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    engine.save(Path(tmp), rank, tokenizer)
                    if rank == 0:
                        (Path(tmp) / "trainer_state.json").write_text(json.dumps(state))
                    has_files = any(Path(tmp).iterdir())
                    ray.train.report({**metrics, "step": state["step"]},
                                     checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)


def epoch_layout(pairs: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, pairs repeated to fill its last batch) so that every pair trains once per epoch."""
    steps = math.ceil(pairs / batch_size)
    return steps, steps * batch_size - pairs


def run(cfg: PipelineConfig, reference_path: str, out_dir: str, run_key: str, mlflow_run_id: str | None) -> dict:
    """Train on the reference Parquet; the final policy lands in <out_dir>/policy as a safetensors folder."""
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    # In a seeded order of its own: Ray Data may lay the same reference rows out in another order from run to run
    # (files, blocks), and batches in another order train another policy. Materialized up front: the read then
    # never competes with the training workers for CPUs.
    ordered = (ray.data.read_parquet(reference_path)
               .map_batches(with_order_key, fn_kwargs={"seed": cfg.run.seed}, batch_format="pyarrow")
               .sort(_ORDER_KEY).drop_columns([_ORDER_KEY]).materialize())
    pairs = ordered.count()
    if pairs < t.batch_size:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the {pairs} pairs available")
    steps_per_epoch, repeated = epoch_layout(pairs, t.batch_size)
    if repeated:
        # Every pair trains each epoch: the last batch is filled with the first pairs of the seeded order (as
        # PyTorch's DistributedSampler pads), rather than the remainder being dropped unseen.
        print(f"[dpo-ray] train: {pairs} pairs at train.batch_size={t.batch_size}: the last batch of each epoch "
              f"repeats {repeated} pair(s) to train the {pairs % t.batch_size} left over", flush=True)
        ordered = ordered.union(ordered.limit(repeated)).materialize()
    # The sort's output blocks follow the input's files and read blocks, and the split between workers follows
    # the blocks: blocks cut at fixed row indices give every worker the same pairs whatever the file layout.
    blocks = t.num_workers * max(1, math.ceil((pairs + repeated) / (t.num_workers * _PAIRS_PER_BLOCK)))
    dataset = ordered.repartition(blocks, shuffle=False).materialize()
    import mlflow

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "init_model": t.init_from or cfg.model.policy,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": steps_per_epoch * t.epochs,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker, **t.resources}),
        run_config=ray.train.RunConfig(
            name=f"train-{run_key[:12]}",
            storage_path=str(cfg.run_dir / "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("train: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as path:
        shutil.copytree(Path(path) / POLICY_DIR, Path(out_dir) / POLICY_DIR)
        state = json.loads((Path(path) / "trainer_state.json").read_text())
    # Per-step values are already in MLflow under their own names; the stage summary keeps the last step's.
    final = {f"final/{k}": v for k, v in result.metrics.items()
             if isinstance(v, (int, float)) and k not in ("step", "nonfinite_steps")}
    return {**final, "pairs": pairs, "pairs_repeated_per_epoch": repeated, "steps": state["step"],
            "nonfinite_steps": state["nonfinite_steps"], "tokens": state["tokens"],
            "resumed_from": state["resumed_from"]}


def _worker_env(cfg: PipelineConfig) -> dict:
    env = {}
    if cfg.train.strategy == "deepspeed" and not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        # A killed JIT build leaves a lock that hangs the next run: give each run its own extensions dir.
        env["TORCH_EXTENSIONS_DIR"] = str(cfg.run_dir / "torch_extensions")
    for name in ("DPO_RAY_CACHE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    # glibc gives each allocating thread an arena; over varying batch shapes the worker's peak RSS crept up
    # (3.70 -> 3.95 GiB from 16 to 64 steps). Two arenas kept it flat (3.68 GiB) at the same speed
    # (benchmarks/README.md, figure 4). A value in the driver's environment wins.
    env["MALLOC_ARENA_MAX"] = os.environ.get("MALLOC_ARENA_MAX", "2")
    return env


def main(argv: list[str] | None = None) -> None:
    from dpo_ray.cli import stage_entry

    stage_entry("train", argv)


if __name__ == "__main__":
    main()
