"""The KL budget: after training, keep the last checkpoint whose policy stays within `train.kl_budget` nats of
the baseline model (evaluate.baseline: the initial model in every round).

A probe is a cheap evaluate: `train.kl_probe_prompts` held-out prompts, one sample each from the checkpoint's policy
at temperature 1, the Monte-Carlo mean of log pi(y|x) - log pi_base(y|x) over them (evaluate's `kl`, on fewer
samples). Checkpoints are probed from the last backward, and the first within budget is kept, so a round that stays
within budget costs one probe. When none is within budget the checkpoint with the least KL is kept, and the stage
says so. Each probe also records its standard error (`kl_stderr`): on the default's 48 prompts it is 0.35-0.65 nats
at 3-9 nats of KL, so a checkpoint that far either side of the budget is within it by chance.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from dpo_ray.config import PipelineConfig
from dpo_ray.ops.prompts import read_split
from dpo_ray.ops.scorers import sampled_with_logps

log = logging.getLogger(__name__)


def choose_checkpoint(probe, steps: list[int], budget: float) -> tuple[int, list[dict]]:
    """The step to keep and every probe made, [{"step", "kl"}]: `probe(step) -> kl` is called from the last step
    backward until one is within `budget`; with none within, the step of least KL (pure; unit-tested)."""
    probes = []
    for step in sorted(steps, reverse=True):
        probes.append({"step": step, "kl": probe(step)})
        if probes[-1]["kl"] <= budget:
            return step, probes
    return min(probes, key=lambda p: p["kl"])["step"], probes


def probe_kl(cfg: PipelineConfig, policy: str, prompts_path: Path) -> tuple[float, float]:
    """KL(policy || baseline) per sequence on the first train.kl_probe_prompts held-out prompts, and its standard
    error."""
    e, s = cfg.evaluate, cfg.sample
    prompts = read_split(prompts_path, "eval").limit(cfg.train.kl_probe_prompts)
    # Materialized, so the last actor is gone before the tasks that read its output need a CPU.
    ds = sampled_with_logps(prompts, cfg, policy, 1, e.max_new_tokens or s.max_new_tokens, 1.0, cfg.held_out_seed + 2,
                            [(policy, "policy_logp"), (cfg.baseline_model, "baseline_logp")]).materialize()
    rows = ds.select_columns(["policy_logp", "baseline_logp"]).take_all()
    kls = [r["policy_logp"] - r["baseline_logp"] for r in rows]
    return statistics.fmean(kls), statistics.stdev(kls) / len(kls) ** 0.5 if len(kls) > 1 else math.nan


def within_budget(cfg: PipelineConfig, policies: dict[int, Path], prompts_path: Path) -> tuple[int, dict]:
    """The step whose policy folder (`policies`: step -> folder) to keep, and the stage statistics of the choice."""
    budget = cfg.train.kl_budget
    stderr = {}

    def probe(step: int) -> float:
        kl, stderr[step] = probe_kl(cfg, str(policies[step]), prompts_path)
        log.info(f"train: KL budget {budget:g} nats: step {step} has KL {kl:.2f} +- {stderr[step]:.2f} "
                 f"({'within' if kl <= budget else 'over'})")
        return kl

    step, probes = choose_checkpoint(probe, list(policies), budget)
    probes = [{**p, "kl_stderr": stderr[p["step"]]} for p in probes]
    met = any(p["step"] == step and p["kl"] <= budget for p in probes)
    if met:
        log.info(f"train: keeping the policy of step {step}")
    else:
        log.warning(f"train: no checkpoint is within the KL budget of {budget:g} nats; keeping step {step}, the "
                    "least KL of them (lower train.lr or epochs, or raise train.beta)")
    return step, {"kl_budget": budget, "kl_probes": probes, "kept_step": step, "kl_budget_met": met,
                  "kept_kl": next(p["kl"] for p in probes if p["step"] == step)}
