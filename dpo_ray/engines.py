"""The two training engines, Ray-free: how a worker's gradients are reduced, stepped and checkpointed.

`DDPEngine` (torch DDP; gloo on CPU, NCCL on GPU) and `DeepSpeedEngine` (DeepSpeed ZeRO-2/3) implement `TrainEngine`,
the one interface the train stage's worker loop uses. Nothing here imports Ray, so the GPU check
(benchmarks/gpu_check.py) runs these engines on a machine without it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from dpo_ray.config import TrainConfig
from dpo_ray.logprobs import SequenceScorer

POLICY_DIR = "policy"
# Under train.lora, the train stage's adapter folder (peft), beside the merged policy.
ADAPTER_DIR = "adapter"


def make_optimizer(model: torch.nn.Module, t: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """train.optimizer over `model`'s trainable parameters. foreach: one multi-tensor kernel per step instead of a
    Python loop over every parameter (torch only picks it by default on GPU). fused (AdamW only): one pass over each
    weight, gradient and both states instead of foreach's several; on a 2-core CPU clip + step of SmolLM2-135M took
    0.21 s against foreach's 0.62 s (benchmarks/README.md, 2026-12-06). DeepSpeed passes fused=False: it swaps the
    parameter groups for its own flat partitions, and torch's fused AdamW has not run under it here."""
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **kernel)


def warmup_schedule(t: TrainConfig):
    # Linear warm-up to lr, then constant, as in the DPO paper.
    return lambda step: min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0


def load_policy_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load into `model` the weights `save` wrote to `folder`: a full model's, or a LoRA adapter's."""
    from safetensors.torch import load_file, load_model

    adapter = folder / "adapter_model.safetensors"
    if not adapter.is_file():
        load_model(model, folder / "model.safetensors", strict=False)
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(adapter))
    if result.unexpected_keys:
        raise RuntimeError(f"{adapter}: weights the model's adapter does not have: {result.unexpected_keys[:3]}")


class TrainEngine(Protocol):
    """A worker's model, optimizer and learning-rate schedule behind one strategy. An optimizer step is

        for each micro-batch:
            with engine.no_sync(skip=it is not the step's last):
                engine.backward(loss of a forward through engine.model)
        grad_norm, stepped = engine.step()

    and only `step()` changes the weights, the optimizer state and the learning rate.
    """

    model: torch.nn.Module
    """The module to call: the `SequenceScorer`, wrapped for the strategy."""

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward. skip=True: more micro-batches of this step follow,
        so reducing gradients across workers can wait for the last. A backward outside it ends an accumulation."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss, already weighted by its share of the step."""

    def step(self) -> tuple[float, bool]:
        """Clip to train.max_grad_norm, step the optimizer and the schedule, clear the gradients: (the global grad
        norm before clipping, whether the step counts as applied: not when that norm is not finite)."""

    def lr(self) -> float:
        """The learning rate after the last step."""

    def save(self, path: Path, rank: int, tokenizer) -> None:
        """Called on every rank: the policy as a safetensors folder in path/POLICY_DIR (under LoRA its adapter
        folder), and what `load` resumes."""

    def load(self, path: Path) -> None:
        """Weights, optimizer and schedule from a folder `save` wrote."""


class DDPEngine:
    def __init__(self, scorer: SequenceScorer, t: TrainConfig, world: int):
        self.t = t
        self.raw = scorer.lm
        self.optimizer = make_optimizer(scorer, t, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(t))
        self.model = scorer
        if world > 1:
            device = next(scorer.parameters()).device
            self.model = torch.nn.parallel.DistributedDataParallel(
                scorer, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, skip: bool):
        return self.model.no_sync() if skip and hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self) -> tuple[float, bool]:
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.t.max_grad_norm or float("inf"))
        finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), finite

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, rank: int, tokenizer) -> None:
        if rank == 0:
            self.raw.save_pretrained(path / POLICY_DIR, safe_serialization=True)
            tokenizer.save_pretrained(path / POLICY_DIR)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       path / "optimizer.pt")

    def load(self, path: Path) -> None:
        load_policy_weights(self.raw, path / POLICY_DIR)
        state = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    def __init__(self, scorer: SequenceScorer, t: TrainConfig, dtype: str, micro: int, accumulation: int):
        import deepspeed

        self.t = t
        optimizer = make_optimizer(scorer, t, fused=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(t))
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": t.zero_stage,
                                  **({"offload_optimizer": {"device": "cpu"}} if t.offload_optimizer else {})},
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
            # A client-built torch optimizer: DeepSpeed's fused Adam would JIT-compile for minutes on CPU.
            "zero_allow_untested_optimizer": True,
            # Offload otherwise insists on its own CPU Adam (the same JIT build); the torch one steps the state
            # where it lies.
            "zero_force_ds_cpu_optimizer": False,
        }
        if t.max_grad_norm:
            config["gradient_clipping"] = t.max_grad_norm
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=scorer, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.raw = self.model.module.lm
        # The loop says where a step's micro-batches end (no_sync), not DeepSpeed's count of them: outside no_sync
        # every backward ends an accumulation, as for DDP.
        self.model.set_gradient_accumulation_boundary(True)

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        # ZeRO-2/3 reduce gradients in every backward, and the boundary's backward also hands them to the
        # optimizer's partitions for step(): the flag must be right before the step's last backward.
        self.model.set_gradient_accumulation_boundary(not skip)
        try:
            yield
        finally:
            self.model.set_gradient_accumulation_boundary(True)

    def backward(self, loss):
        # DeepSpeed divides by gradient_accumulation_steps itself; the loop already weighted each micro-batch.
        self.model.backward(loss * self.model.gradient_accumulation_steps(), scale_wrt_gas=True)

    def step(self) -> tuple[float, bool]:
        # At the boundary DeepSpeed's step clips to gradient_clipping, steps the optimizer and the lr scheduler.
        self.model.step()
        norm = self.model.get_global_grad_norm()
        if norm is None:
            return float("nan"), True
        return float(norm), math.isfinite(float(norm))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, rank: int, tokenizer) -> None:
        self.model.save_checkpoint(str(path / "deepspeed"), tag="state")
        state_dict = None
        if self.t.zero_stage == 3:
            # Every rank takes part; rank 0 gets the full weights on its CPU, gathered one module at a time, so
            # no GPU ever holds more than one layer beyond its shard (gathering the whole model at once would put
            # all of a 70B model on every GPU). The same consolidation as DeepSpeed's save_16bit_model, which
            # can only write a pickled .bin; HF accelerate calls it the same way.
            state_dict = self.model._zero3_consolidated_16bit_state_dict()
            if rank == 0:
                state_dict = {k.removeprefix("lm."): v for k, v in state_dict.items()}
        if rank == 0:
            self.raw.save_pretrained(path / POLICY_DIR, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(path / POLICY_DIR)

    def load(self, path: Path) -> None:
        self.model.load_checkpoint(str(path / "deepspeed"), tag="state")
