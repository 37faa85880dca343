"""Step time and peak memory of the train step: full fine-tuning against LoRA and gradient checkpointing (issue 18).

Each variant runs in a process of its own (so its peak RSS is its own): SmolLM2 fp32, the train stage's step as
figure 1 times it (`_micro_batches`, `dpo_forward`, backward, clip, AdamW on the DDPEngine with world size 1), the
same pairs and reference log-probs (computed once, in the parent, by the reference stage's scorer). Variants:

  full          every weight trains (the default)
  lora          train.lora={r: 16, alpha: 32}, every linear layer but the LM head
  checkpointing train.gradient_checkpointing=true (no shared prompt: the KV cache is off under checkpointing)
  lora+ckpt     both

Reported per variant: median step time over the timed steps, the peak RSS during the steps (VmHWM reset once the
model and engine are built: weights, gradients, optimizer state, activations and the interpreter), the RSS once
built, and the first step's loss (the same weights and batch give the same loss for every variant at step 1).

The memory plan's check (`dpo-ray plan`, dpo_ray/memory_plan.py): the plan's total for the variant, at the
longest prompt and completion of the steps' batches, against what the steps needed, measured as the peak RSS less
the RSS before the model was loaded. Children run with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB: glibc's default
threshold grows as large blocks are freed, after which freed activations stay in the heap and the RSS stays at
its high-water mark; fixed, every large tensor is its own mapping, returned on free, and RSS follows the live
tensors (the first runs, without it, read 0.5-0.9 GiB more for LoRA than this does).

    .venv-bench/bin/python benchmarks/memory_savers.py --batch-size 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

VARIANTS = {"full": {}, "lora": {"lora": {"r": 16, "alpha": 32}}, "checkpointing": {"gradient_checkpointing": True},
            "lora+ckpt": {"lora": {"r": 16, "alpha": 32}, "gradient_checkpointing": True}}


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak since start or the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so the peak read later is the steps' own, not an import's.
    Path("/proc/self/clear_refs").write_text("5")


def child(variant: str, workload: Path, steps: int, warmup: int, threads: int) -> dict:
    """One variant's steps in this process; what main() records for it."""
    from dpo_ray.config import TrainConfig
    from dpo_ray.engines import DDPEngine
    from dpo_ray.logprobs import SequenceScorer
    from dpo_ray.models import with_lora
    from dpo_ray.stages.train import _micro_batches, dpo_forward

    common.set_threads(threads)
    rss_start = _status_mib("VmRSS")
    data = json.loads(workload.read_text())
    pairs, path, pad = data["pairs"], data["path"], data["pad_id"]
    batch = data["batch_size"]
    t = TrainConfig(beta=0.1, lr=1e-6, batch_size=batch, micro_batch_size=batch, **VARIANTS[variant])
    lm = common.load_model(path, train=True)
    if t.lora:
        lm = with_lora(lm, t.lora, path)
    if t.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = DDPEngine(SequenceScorer(lm), t, world=1)
    engine.model.train()
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    rss_built = _status_mib("VmRSS")
    _reset_peak()
    times, losses = [], []
    for i in range(warmup + steps):
        rows = {k: [p[k] for p in pairs[i * batch:(i + 1) * batch]]
                for k in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")}
        start = time.perf_counter()
        for rows_m in _micro_batches(rows, t.micro_batch_size):
            out, metrics, _ = dpo_forward(engine.model, rows_m, pad, t)
            engine.backward(out.loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
        common.log(f"{variant}: step {i + 1}/{warmup + steps} {times[-1]:.1f} s, loss {losses[-1]:.5f}")
    peak = _status_mib("VmHWM")
    return {"variant": variant, "trainable_params": trainable, "step": common.summarize(times, warmup),
            "rss_start_mib": rss_start, "rss_built_mib": rss_built, "peak_rss_mib": peak,
            "plan": _plan_check(path, t, pairs[: (warmup + steps) * batch], batch, peak - rss_start),
            "losses": losses}


def _plan_check(path: str, t, pairs: list[dict], batch: int, measured_mib: float) -> dict:
    from dpo_ray.memory_plan import Setting, estimate, model_shape

    prompt = max(len(p["prompt_ids"]) for p in pairs)
    completion = max(max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    est = estimate(model_shape(path, t.lora), Setting("ddp", t.lora is not None, t.gradient_checkpointing),
                   "float32", 1, batch, prompt, completion, t.lora)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "estimate_mib": est.total / 2**20,
            "activations_mib": est.activations / 2**20, "measured_mib": measured_mib,
            "estimate_vs_measured": est.total / 2**20 / measured_mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.workload), args.steps, args.warmup, args.threads)))
        return

    from train_throughput import reference_logps

    tokenizer, path = common.load_tokenizer_and_path()
    pairs = common.build_pairs(tokenizer, args.batch_size * (args.warmup + args.steps))
    ref_c, ref_r = reference_logps(path, pairs)
    for pair, c, r in zip(pairs, ref_c, ref_r):
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = c, r
    workload = common.RESULTS / "memory_savers_workload.json"
    workload.parent.mkdir(parents=True, exist_ok=True)
    workload.write_text(json.dumps({"pairs": pairs, "path": path, "pad_id": tokenizer.pad_token_id,
                                    "batch_size": args.batch_size}))
    peak = common.matmul_peak_gflops(threads=args.threads)
    results = {}
    try:
        for variant in args.variants.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--workload", str(workload),
                                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=False,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
            if proc.returncode:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        workload.unlink(missing_ok=True)
    full = results.get("full")
    for name, r in results.items():
        if full:
            r["step_time_vs_full"] = r["step"]["median_s"] / full["step"]["median_s"]
            r["peak_rss_vs_full"] = r["peak_rss_mib"] / full["peak_rss_mib"]
        common.log(f"{name}: {r['step']['median_s']:.2f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB "
                   f"(built {r['rss_built_mib']:.0f}), trainable {r['trainable_params'] / 1e6:.2f}M, "
                   f"first loss {r['losses'][0]:.6f}; plan {r['plan']['estimate_mib']:.0f} MiB against "
                   f"{r['plan']['measured_mib']:.0f} measured ({r['plan']['estimate_vs_measured']:.2f}x)")
    out = common.write_result("memory_savers", {"machine": common.machine_info(), "code": common.code_version(),
                                                "matmul_peak": peak, "pairs": common.describe_pairs(pairs),
                                                "batch_size": args.batch_size, "variants": results})
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
