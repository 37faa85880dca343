"""train: Ray Train minimizes the DPO loss family on pairs with precomputed reference log-probs.

The distributed layer is thin: `TorchTrainer` starts the workers, each reads its shard of the reference
Parquet as a Ray dataset, and the engines of `dpo_ray.engines` (torch DDP, DeepSpeed ZeRO-2/3) hide the one
difference between strategies: how gradients are reduced, stepped and checkpointed. No reference model is ever
loaded here. Rerunning with the same inputs resumes from the last checkpoint (same Ray Train name and path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dpo_ray import keys, schemas
from dpo_ray.config import PipelineConfig, TrainConfig
from dpo_ray.engines import ADAPTER_DIR, POLICY_DIR, DDPEngine, DeepSpeedEngine, TrainEngine
from dpo_ray.errors import ConfigError, TrainingError
from dpo_ray.logprobs import SequenceScorer, shared_prompt_batch
from dpo_ray.losses import REFERENCE_FREE, DPOOutput, dpo_objective, reward_metrics
from dpo_ray.models import (ModelSpec, adapter_base, load_causal_lm, model_fingerprint, resolve_model,
                            set_torch_threads, with_lora)
from dpo_ray.ops.kl_budget import within_budget
from dpo_ray.ops.prompts import held_out_prompts
from dpo_ray.runner import StageContext
from dpo_ray.tracking import prepare_model_logging

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from transformers import PreTrainedTokenizerBase


log = logging.getLogger(__name__)
# `prompts`: the held-out prompts the KL budget (train.kl_budget) probes on; without it they are split from
# data.prompts as the sample stage would.
SOURCES = {"reference": True, "prompts": False}


class NonFiniteError(TrainingError):
    pass


_ORDER_KEY = "_order"
# Rows per block of the training dataset (token ids, a few KiB a pair): small enough to stream to a worker.
_PAIRS_PER_BLOCK = 1024
# The largest reference output (Parquet bytes) the driver puts in its seeded order itself (_seeded_order).
_DRIVER_ORDER_BYTES = 64 * 2**20


def with_order_key(batch: pa.Table, seed: int) -> pa.Table:
    """`batch` plus a sort key per pair: a hash of its pair_id and the seed. Pairs sorted by it come in one
    pseudo-random order that depends on the seed and the pairs, not on how Parquet files and blocks hold them."""
    salt = seed.to_bytes(8, "little", signed=True)
    keys = [int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8, salt=salt).digest(), "little")
            for pid in batch["pair_id"].to_pylist()]
    return batch.append_column(_ORDER_KEY, pa.array(keys, pa.uint64()))


def dpo_forward(model, rows: dict[str, list], pad_id: int, t: TrainConfig) -> tuple[DPOOutput, dict, int]:
    """One forward of B pairs and the DPO objective; `model` is a (wrapped) `SequenceScorer`.

    rows: prompt_ids, chosen_ids, rejected_ids (lists of B token lists); ref_chosen_logps, ref_rejected_logps (B),
    absent for a reference-free loss. Each prompt runs once and both of its completions continue from its KV cache.
    Returns the loss output, the TRL-named metrics and the pair tokens (prompt+chosen and prompt+rejected, the
    prompt counted twice, as a trainer without prompt sharing would process them).
    """
    batch = shared_prompt_batch(rows["prompt_ids"], list(zip(rows["chosen_ids"], rows["rejected_ids"])), pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logps, counts = model(**batch)
    chosen, rejected = logps[0::2], logps[1::2]
    ref_chosen, ref_rejected = (
        (None, None) if t.loss in REFERENCE_FREE else
        (torch.as_tensor(np.asarray(rows[c], dtype=np.float32), device=device) for c in schemas.REFERENCE_COLUMNS))
    out = dpo_objective(chosen, rejected, ref_chosen, ref_rejected, counts[0::2], counts[1::2], t.beta, t.loss,
                        t.label_smoothing, t.rpo_alpha, t.simpo_gamma, t.length_normalize)
    pair_tokens = 2 * int(batch["prompt_mask"].sum()) + int(batch["completion_mask"].sum())
    return out, reward_metrics(out, chosen, rejected), pair_tokens


def _lists(batch: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: [x.tolist() if isinstance(x, np.ndarray) else x for x in v] for k, v in batch.items()}


def _micro_batches(rows: dict[str, list], size: int) -> list[dict[str, list]]:
    """Split one step's rows into micro-batches of similar length, so padding costs little."""
    n = len(rows["prompt_ids"])
    order = sorted(range(n), key=lambda i: len(rows["prompt_ids"][i])
                   + max(len(rows["chosen_ids"][i]), len(rows["rejected_ids"][i])))
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


def _say(line: str) -> None:
    # Ray Train replaces print() in its workers with one that logs the line and, where sys.stdout is not the
    # process's own stream (it is not in a Ray worker), prints it as well: the console showed every line twice.
    # A line written to the process's own stdout is printed once, and Ray still forwards it to the driver.
    print(line, file=sys.__stdout__, flush=True)


def _format_eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


@dataclass(frozen=True)
class WorkerSpec:
    """What every training worker reads, built from the validated config in the driver."""

    train: TrainConfig
    model: ModelSpec  # the initial policy
    seed: int
    steps_per_epoch: int
    total_steps: int
    mlflow_run_id: str | None
    tracking_uri: str


@dataclass
class Worker:
    """What one training worker sets up once and every step uses."""

    spec: WorkerSpec
    rank: int
    world: int
    pairs_per_step: int  # this worker's share of train.batch_size
    tokenizer: PreTrainedTokenizerBase
    engine: TrainEngine
    tracker: MlflowClient | None  # on rank 0, when the stage logs to MLflow


@dataclass
class TrainState:
    """The progress a checkpoint carries, as trainer_state.json."""

    step: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    tokens: float = 0
    # The optimizer steps' own wall time, summed: the stage's seconds beyond it are fixed costs (start-up, data,
    # checkpoints, publishing).
    step_seconds: float = 0
    # Carried into every later checkpoint, so the stage's stats record each interruption it recovered from.
    resumed_from: list[int] = field(default_factory=list)

    def count_step(self, applied: bool, max_nonfinite_steps: int) -> None:
        """Count a finished step; NonFiniteError when it makes max_nonfinite_steps unapplied ones in a row."""
        self.step += 1
        self.nonfinite_steps += not applied
        self.nonfinite_in_a_row = 0 if applied else self.nonfinite_in_a_row + 1
        if self.nonfinite_in_a_row >= max_nonfinite_steps:
            raise NonFiniteError(
                f"train: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(last at step {self.step}); see train.max_nonfinite_steps"
            )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's function on every worker: set up, resume, then train, log and checkpoint step by step."""
    worker = setup(config["spec"])
    state = resume(worker)
    started, first_step = time.time(), state.step
    for epoch, batch in step_batches(worker, first_step):
        metrics = train_step(worker, state, epoch, batch)
        eta = (time.time() - started) / (state.step - first_step) * (worker.spec.total_steps - state.step)
        log_step(worker, state, metrics, eta)
        if state.step == worker.spec.total_steps or state.step % worker.spec.train.checkpoint_every == 0:
            save_checkpoint(worker, state, metrics)


def setup(spec: WorkerSpec) -> Worker:
    """The worker's seeded model and tokenizer, and its strategy's engine, ready to train."""
    t = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_torch_threads(spec.model.torch_threads)
    torch.manual_seed(spec.seed)
    tokenizer = spec.model.load_tokenizer()
    lm = spec.model.load_causal_lm(ray.train.torch.get_device())
    if t.lora:
        lm = with_lora(lm, t.lora, spec.model.path)
    if t.gradient_checkpointing:
        # Non-reentrant: the reentrant form drops the gradient of inputs that need none, as embeddings' outputs.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = SequenceScorer(lm, spec.model.dtype)
    per_worker = t.batch_size // world
    engine: TrainEngine
    if t.strategy == "deepspeed":
        engine = DeepSpeedEngine(scorer, t, spec.model.dtype, t.micro_batch_size, per_worker // t.micro_batch_size)
    else:
        engine = DDPEngine(scorer, t, world)
    engine.model.train()
    tracker = None
    if rank == 0 and spec.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(spec.tracking_uri)
    return Worker(spec, rank, world, per_worker, tokenizer, engine, tracker)


def resume(worker: Worker) -> TrainState:
    """The state of Ray Train's latest checkpoint, whose weights and optimizer the engine loads; fresh if none."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainState()
    with checkpoint.as_directory() as path:
        worker.engine.load(Path(path))
        state = TrainState(**json.loads((Path(path) / "trainer_state.json").read_text()))
    state.resumed_from.append(state.step)
    if worker.rank == 0:
        _say(f"[train] resumed from step {state.step}")
    return state


def step_batches(worker: Worker, done: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(epoch, this worker's pairs) for each step after the first `done`: those of an uninterrupted run."""
    spec = worker.spec
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(done // spec.steps_per_epoch, spec.train.epochs):
        batches = shard.iter_batches(batch_size=worker.pairs_per_step, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=worker.pairs_per_step * 4,
                                     local_shuffle_seed=spec.seed + epoch)
        for index, batch in enumerate(batches):
            if index >= spec.steps_per_epoch:
                break
            if epoch * spec.steps_per_epoch + index >= done:
                yield epoch, batch


def train_step(worker: Worker, state: TrainState, epoch: int, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """One optimizer step on this worker's pairs; counts it in `state` and returns its metrics, averaged over
    workers. Raises NonFiniteError when train.max_nonfinite_steps steps in a row were not finite."""
    t = worker.spec.train
    started = time.time()
    totals, tokens, finite = accumulate_gradients(worker, _lists(batch))
    grad_norm, stepped = worker.engine.step()
    state.count_step(stepped and finite, t.max_nonfinite_steps)
    reduced = _all_reduce([totals[k] for k in sorted(totals)] + [tokens])
    metrics = {k: v / worker.world for k, v in zip(sorted(totals), reduced[:-1])}
    step_tokens = reduced[-1]
    state.tokens += step_tokens
    elapsed = time.time() - started
    state.step_seconds += elapsed
    metrics.update({
        "grad_norm": grad_norm, "learning_rate": worker.engine.lr(), "tokens_per_s": step_tokens / elapsed,
        "pairs_per_s": t.batch_size / elapsed, "epoch": epoch, "nonfinite_steps": state.nonfinite_steps,
    })
    return metrics


def accumulate_gradients(worker: Worker, rows: dict[str, list]) -> tuple[dict[str, float], int, bool]:
    """Forward and backward of one step's rows in micro-batches, each weighted by its share of the worker's pairs:
    (metrics weighted alike, pair tokens, whether every micro-batch's loss was finite on every worker)."""
    t, engine = worker.spec.train, worker.engine
    totals: dict[str, float] = {}
    tokens, all_finite = 0, True
    micro = _micro_batches(rows, t.micro_batch_size)
    for m, micro_rows in enumerate(micro):
        with engine.no_sync(m < len(micro) - 1):
            out, step_metrics, n_tokens = dpo_forward(engine.model, micro_rows, worker.tokenizer.pad_token_id, t)
            weight = len(micro_rows["prompt_ids"]) / worker.pairs_per_step
            finite = _all_reduce([float(torch.isfinite(out.loss))], dist.ReduceOp.MIN)[0] > 0
            engine.backward(out.loss * weight if finite else _zero_loss(engine.model))
        all_finite = all_finite and finite
        tokens += n_tokens
        for k, v in step_metrics.items():
            totals[k] = totals.get(k, 0.0) + v * weight
    return totals, tokens, all_finite


def log_step(worker: Worker, state: TrainState, metrics: dict[str, float], eta: float) -> None:
    """Rank 0 prints the step's line and logs its metrics to the stage's MLflow run."""
    if worker.rank != 0:
        return
    _say(f"[train] step {state.step}/{worker.spec.total_steps} loss {metrics['loss']:.4f} "
         f"acc {metrics['rewards/accuracies']:.2f} margin {metrics['rewards/margins']:.3f} "
         f"{metrics['tokens_per_s']:.0f} tok/s ETA {_format_eta(eta)}")
    if worker.tracker:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        worker.tracker.log_batch(worker.spec.mlflow_run_id, metrics=[
            Metric(k, float(v), now, state.step) for k, v in metrics.items() if math.isfinite(v)])


def save_checkpoint(worker: Worker, state: TrainState, metrics: dict[str, float]) -> None:
    """Every rank saves its part; Ray Train keeps the folder as the run's latest checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        worker.engine.save(Path(tmp), worker.rank, worker.tokenizer)
        if worker.rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps(asdict(state)))
        has_files = any(Path(tmp).iterdir())
        ray.train.report({**metrics, "step": state.step},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)


def epoch_layout(pairs: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, pairs repeated to fill its last batch) so that every pair trains once per epoch."""
    steps = math.ceil(pairs / batch_size)
    return steps, steps * batch_size - pairs


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    init = cfg.train.init_from
    key = {**keys.policy(cfg, trains=True), "reference": digests["reference"], "train": keys.settings(cfg, "train"),
           "init": model_fingerprint(init) if init else None}
    if cfg.train.kl_budget is not None:
        # What the probes sample and score, since they choose the policy.
        key["kl_probe"] = {"prompts": keys.held_out_prompts(cfg, digests),
                           "baseline": model_fingerprint(cfg.baseline_model), "sample": cfg.sample.model_dump(),
                           "max_new_tokens": cfg.evaluate.max_new_tokens, "limits": keys.limits(cfg)}
    return key


def run(ctx: StageContext) -> dict:
    """Train on the reference Parquet; the final policy lands in <out>/policy as a safetensors folder."""
    cfg, t = ctx.cfg, ctx.cfg.train
    _check_pairs(ctx.sources["reference"], t.loss)
    start = t.init_from or cfg.model.policy
    if t.lora and t.lora.quantize and adapter_base(resolve_model(start)):
        # A 4-bit base keeps a loaded adapter unmerged (models.load_causal_lm); a new adapter cannot go on top.
        raise ConfigError(f"train.lora.quantize: {start} is a LoRA adapter folder; QLoRA trains on a full model "
                          "(publish the previous round's policy merged, train.lora.merge=true)")
    if cfg.run.log_model and ctx.run_id:  # a tracked run logs the policy when the stage ends
        prepare_model_logging()
    ordered = _seeded_order(str(ctx.sources["reference"]), cfg.run.seed)
    pairs = ordered.count()
    if pairs < t.batch_size:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the {pairs} pairs available")
    steps_per_epoch, repeated = epoch_layout(pairs, t.batch_size)
    if repeated:
        # Every pair trains each epoch: the last batch is filled with the first pairs of the seeded order (as
        # PyTorch's DistributedSampler pads), rather than the remainder being dropped unseen.
        log.info(f"train: {pairs} pairs at train.batch_size={t.batch_size}: the last batch of each epoch "
                 f"repeats {repeated} pair(s) to train the {pairs % t.batch_size} left over")
        ordered = with_repeats(ordered, repeated)
    dataset = _worker_blocks(ordered, pairs + repeated, t.num_workers)
    result = _trainer(cfg, dataset, steps_per_epoch, ctx.key, ctx.run_id).fit()
    if result.checkpoint is None:
        raise RuntimeError("train: Ray Train finished without a checkpoint")
    kept, budget = result.checkpoint, {}
    if t.kl_budget is not None:
        # Every checkpoint is kept when a budget is set (_trainer), each a local folder with its policy. Only those
        # still on disk: a rerun after an interrupted prune finds the kept and the last, and the rule picks the same.
        checkpoints = {metrics["step"]: checkpoint for checkpoint, metrics in result.best_checkpoints
                       if Path(checkpoint.path).is_dir()}
        step, budget = within_budget(cfg, {k: Path(c.path) / POLICY_DIR for k, c in checkpoints.items()},
                                     held_out_prompts(ctx.cfg, ctx.sources, ctx.out))
        kept = checkpoints[step]
    with kept.as_directory() as path:
        publish_policy(Path(path) / POLICY_DIR, ctx.out, cfg)
    if t.kl_budget is not None:
        budget["checkpoints_pruned"] = _prune(checkpoints, keep={step, max(checkpoints)})
    with result.checkpoint.as_directory() as path:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
    # Per-step values are already in MLflow under their own names; the stage summary keeps the last step's.
    final = {f"final/{k}": v for k, v in result.metrics.items()
             if isinstance(v, (int, float)) and k not in ("step", "nonfinite_steps")}
    return {**final, "pairs": pairs, "pairs_repeated_per_epoch": repeated, "steps": state["step"],
            "nonfinite_steps": state["nonfinite_steps"], "tokens": state["tokens"],
            "step_seconds": state.get("step_seconds", 0.0), "resumed_from": state["resumed_from"], **budget}


def publish_policy(trained: Path, out: Path, cfg: PipelineConfig) -> None:
    """The kept checkpoint's policy as out/policy. Under LoRA its adapter goes to out/adapter and out/policy is the
    base with the adapter merged in (train.lora.merge) or the adapter folder itself."""
    lora = cfg.train.lora
    if lora:
        shutil.copytree(trained, out / ADAPTER_DIR)
    if lora and lora.merge:
        load_causal_lm(str(trained), cfg.model.dtype).save_pretrained(out / POLICY_DIR, safe_serialization=True)
        for tokenizer_file in (f for f in trained.iterdir() if not f.name.startswith(("adapter_", "README"))):
            shutil.copy2(tokenizer_file, out / POLICY_DIR)
    else:
        shutil.copytree(trained, out / POLICY_DIR)


def _check_pairs(path: Path, loss: str) -> None:
    # A reference-free loss trains on the label stage's pairs as well as on the reference stage's output.
    schemas.check_folder(path, schemas.PAIRS)
    if loss in REFERENCE_FREE:
        return
    try:
        schemas.check_folder(path, schemas.REFERENCE)  # the pairs are right: what fails is the reference columns
    except schemas.SchemaError as err:
        raise schemas.SchemaError(f"{err}: train.loss={loss} needs reference log-probs; give --reference the "
                                  "reference stage's output, or use a reference-free loss (simpo, orpo)") from None


def _prune(checkpoints: dict[int, ray.train.Checkpoint], keep: set[int]) -> int:
    """Delete the checkpoints the KL budget did not choose (a full model and optimizer each: the recipe's run folder
    reached 20 GB with all of them), keeping the chosen one and the last, which Ray Train resumes from."""
    pruned = [step for step in checkpoints if step not in keep]
    for step in pruned:
        shutil.rmtree(checkpoints[step].path)
    if pruned:
        log.info(f"train: deleted the {len(pruned)} checkpoint(s) the KL budget did not keep")
    return len(pruned)


def _seeded_order(reference_path: str, seed: int, driver_bytes: int = _DRIVER_ORDER_BYTES) -> ray.data.Dataset:
    # In a seeded order of its own: Ray Data may lay the same reference rows out in another order from run to run
    # (files, blocks), and batches in another order train another policy. Materialized up front: the read then
    # never competes with the training workers for CPUs. Up to `driver_bytes` of Parquet the driver orders it with
    # Arrow: Ray Data's distributed sort of the default's 96 pairs took 7 s of task start-ups on two cores.
    files = schemas.parquet_files(reference_path)
    if sum(os.path.getsize(f) for f in files) <= driver_bytes:
        table = with_order_key(pq.ParquetDataset(files).read(), seed)
        return ray.data.from_arrow(table.sort_by(_ORDER_KEY).drop_columns([_ORDER_KEY]))
    return (ray.data.read_parquet(files)
            .map_batches(with_order_key, fn_kwargs={"seed": seed}, batch_format="pyarrow")
            .sort(_ORDER_KEY).drop_columns([_ORDER_KEY]).materialize())


def with_repeats(ordered: ray.data.Dataset, repeated: int) -> ray.data.Dataset:
    """`ordered` followed by its first `repeated` rows. Built from the block references in order: Ray Data's union
    interleaves its inputs' blocks (a four-block sort output came out as pairs 0-6, the repeats, then 7-28)."""
    return ray.data.from_arrow_refs([*ordered.to_arrow_refs(), *ordered.limit(repeated).to_arrow_refs()])


def _worker_blocks(ordered: ray.data.Dataset, rows: int, num_workers: int) -> ray.data.Dataset:
    # The sort's output blocks follow the input's files and read blocks, and the split between workers follows
    # the blocks: blocks cut at fixed row indices give every worker the same pairs whatever the file layout.
    blocks = num_workers * max(1, math.ceil(rows / (num_workers * _PAIRS_PER_BLOCK)))
    return ordered.repartition(blocks, shuffle=False).materialize()


def _trainer(cfg: PipelineConfig, dataset: ray.data.Dataset, steps_per_epoch: int, run_key: str,
             mlflow_run_id: str | None):
    import mlflow
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    # Ray Train's controller collects a worker's report when it polls (every 2 s by default), and a worker's next
    # report waits until the last was collected: with a checkpoint every few short steps, each one held training
    # 1.1-1.2 s (tiny, 40 steps, 20 checkpoints: 66 s at 2 s, 39 s at 0.5 s). The controller takes the variable
    # from the driver's environment, where a value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    quantize = t.lora.quantize if t.lora else None
    spec = WorkerSpec(t, ModelSpec.of(cfg, t.init_from or cfg.model.policy, quantize), cfg.run.seed, steps_per_epoch,
                      steps_per_epoch * t.epochs, mlflow_run_id, mlflow.get_tracking_uri())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker, **t.resources}),
        run_config=ray.train.RunConfig(
            name=f"train-{run_key[:12]}",
            storage_path=str(cfg.run_dir / "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None if t.kl_budget is not None else 2),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets={"train": dataset},
    )


def _worker_env(cfg: PipelineConfig) -> dict:
    env = {}
    if cfg.train.strategy == "deepspeed" and not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        # A killed JIT build leaves a lock that hangs the next run: give each run its own extensions dir, unless
        # the driver's environment names one (the test suite shares one, so DeepSpeed's ops build once, not per run).
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(cfg.run_dir / "torch_extensions")
    for name in ("DPO_RAY_CACHE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    # glibc gives each allocating thread an arena; over varying batch shapes the worker's peak RSS crept up
    # (3.70 -> 3.95 GiB from 16 to 64 steps). Two arenas kept it flat (3.68 GiB) at the same speed
    # (benchmarks/README.md, figure 4). A value in the driver's environment wins.
    env["MALLOC_ARENA_MAX"] = os.environ.get("MALLOC_ARENA_MAX", "2")
    return env

