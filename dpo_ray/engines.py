"""The two training engines, Ray-free: how a worker's gradients are reduced, stepped and checkpointed.

`DDPEngine` (torch DDP; gloo on CPU, NCCL on GPU) and `DeepSpeedEngine` (DeepSpeed ZeRO-2/3) share one interface,
which the train stage's worker loop uses and nothing else:

    engine.model               the module to call (SequenceScorer, wrapped for the strategy)
    engine.no_sync(skip)       context for one micro-batch's backward; skip=True defers gradient reduction
    engine.backward(loss)      accumulate gradients of one micro-batch
    engine.step()              end of an optimizer step -> (global grad norm, whether the step was applied)
    engine.lr()                learning rate after the step
    engine.save(path, rank, tokenizer) / engine.load(path)

Nothing here imports Ray, so the GPU check (benchmarks/gpu_check.py) runs these engines on a machine without it.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from dpo_ray.config import TrainConfig
from dpo_ray.logprobs import SequenceScorer

POLICY_DIR = "policy"


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach: one multi-tensor kernel per step instead of a Python loop over every parameter (torch only picks
    # it by default on GPU).
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)


def warmup_schedule(t: TrainConfig):
    # Linear warm-up to lr, then constant, as in the DPO paper.
    return lambda step: min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0


class DDPEngine:
    def __init__(self, scorer: SequenceScorer, t: TrainConfig, world: int):
        self.t = t
        self.raw = scorer.lm
        self.optimizer = make_optimizer(scorer, t)
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
        from safetensors.torch import load_model

        load_model(self.raw, path / POLICY_DIR / "model.safetensors", strict=False)
        state = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    def __init__(self, scorer: SequenceScorer, t: TrainConfig, dtype: str, micro: int, accumulation: int):
        import deepspeed

        self.t = t
        optimizer = make_optimizer(scorer, t)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(t))
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
            # A client-built torch optimizer: DeepSpeed's fused Adam would JIT-compile for minutes on CPU.
            "zero_allow_untested_optimizer": True,
        }
        if t.max_grad_norm:
            config["gradient_clipping"] = t.max_grad_norm
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=scorer, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.raw = self.model.module.lm

    def no_sync(self, skip: bool):
        return contextlib.nullcontext()

    def backward(self, loss):
        # DeepSpeed divides by gradient_accumulation_steps itself; the loop already weighted each micro-batch.
        self.model.backward(loss * self.model.gradient_accumulation_steps(), scale_wrt_gas=True)
        # DeepSpeed's step() counts micro-batches and applies the optimizer only at the accumulation boundary,
        # so it belongs after every backward.
        self.model.step()

    def step(self) -> tuple[float, bool]:
        # The optimizer step already happened in the last backward (at the boundary); report what it saw.
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
