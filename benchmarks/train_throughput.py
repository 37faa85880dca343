"""Figure 1: DPO train-step throughput, dpo-ray against TRL's DPOTrainer, in one process, steps interleaved.

Sides (each its own copy of the model and its own AdamW, same initial weights, fp32, same threads):
  ours            the body of dpo_ray.stages.train.train_loop_per_worker for one step: _micro_batches, dpo_forward,
                  backward, clip_grad_norm_, AdamW step (the DDPEngine with world size 1, the model wrapped as
                  the loop wraps it), reference log-probs precomputed by the reference stage's LogProbScorer.
  trl_precompute  TRL DPOTrainer(precompute_ref_log_probs=True): its collator, Trainer.training_step (the
                  trainer's compute_loss + backward), then what Trainer's inner loop does after it: clip_grad_norm_,
                  optimizer.step, lr_scheduler.step, zero_grad. Reference log-probs come from TRL's own precompute.
  trl_ref         the same with precompute_ref_log_probs=False and an explicit reference model (a second copy):
                  the reference forward runs inside every step.

Step i of every side trains on the same B pairs (the same token ids, fed to TRL through its own collator), so the
padded batch shape is the same. Not timed: Ray Data iteration and MLflow logging (ours), the DataLoader and logging
of Trainer.train (TRL). Order per round: ours, trl_precompute, trl_ref, repeated; the first --warmup rounds are
discarded, the median of the rest is reported.

Tokens per step = non-padding tokens of the 2B sequences (prompt + chosen, prompt + rejected): the prompt counts
twice, as it is processed twice; this is the count the train stage logs as tokens_per_s.
MFU = 6 * parameters * tokens/s / the best fp32 torch.matmul GFLOP/s measured in the same process (before and
after the steps). mfu_executed uses the tokens a side's forward actually runs instead: ours scores each prompt
once for both completions, TRL twice, so for ours it is lower than the (comparable) mfu.

    .venv-bench/bin/python benchmarks/train_throughput.py --steps 4 --warmup 2 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings

import torch

import common


def reference_logps(path: str, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """The reference stage's scorer (LogProbScorer, in this process, no Ray) over the pairs: what training reads."""

    from dpo_ray import schemas
    from dpo_ray.config import load_config
    from dpo_ray.ops.scorers import LogProbScorer, ScorerSpec

    cfg = load_config(common.ROOT / "configs" / "default.yaml", [f"model.policy={path}"])
    scorer = LogProbScorer(ScorerSpec.of(cfg, path, {"chosen_ids": "ref_chosen_logps",
                                                     "rejected_ids": "ref_rejected_logps"}))
    table = scorer(schemas.rows_to_table(pairs, schemas.PAIRS))
    del scorer
    return table["ref_chosen_logps"].to_pylist(), table["ref_rejected_logps"].to_pylist()


def train_rows(pairs: list[dict], ref_c: list[float], ref_r: list[float], slot) -> dict[str, list]:
    """The columns the train step reads, for the pairs at indices `slot`."""
    out = {k: [pairs[j][k] for j in slot] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    out["ref_chosen_logps"] = [ref_c[j] for j in slot]
    out["ref_rejected_logps"] = [ref_r[j] for j in slot]
    return out


def build_engine(path: str, t, dtype: str = "float32"):
    """Model and engine as train_loop_per_worker builds them for one CPU worker (the DDPEngine path, world size 1);
    `dtype` is model.dtype (bf16-mixed: float32 weights, forward under bf16 autocast)."""
    from dpo_ray import logprobs
    from dpo_ray.engines import DDPEngine

    lm = common.load_model(path)
    # Since the prompt-sharing change the engine wraps the LM in SequenceScorer; before it, the bare LM.
    model = logprobs.SequenceScorer(lm, dtype) if hasattr(logprobs, "SequenceScorer") else lm
    engine = DDPEngine(model, t, world=1)
    engine.model.train()
    return lm, engine


def _our_side(path: str, pairs: list[dict], tokenizer, batch: int, beta: float, lr: float, slot):
    from dpo_ray.config import TrainConfig
    from dpo_ray.stages.train import _all_reduce, _micro_batches, _zero_loss, dpo_forward

    pad = tokenizer.pad_token_id
    ref_c, ref_r = reference_logps(path, pairs)  # not timed: the reference stage's output
    t = TrainConfig(beta=beta, lr=lr, batch_size=batch, micro_batch_size=batch, max_grad_norm=1.0, warmup_steps=0)
    lm, engine = build_engine(path, t)

    def step(i: int) -> dict:
        # The body of train_loop_per_worker's step loop, minus Ray Data, metric reduction, logging, checkpoints.
        tokens = 0
        micro = _micro_batches(train_rows(pairs, ref_c, ref_r, slot(i)), t.micro_batch_size)
        for m, rows in enumerate(micro):
            with engine.no_sync(m < len(micro) - 1):
                out, metrics, n_tokens = dpo_forward(engine.model, rows, pad, t)
                weight = len(rows["prompt_ids"]) / len(slot(i))
                finite = _all_reduce([float(torch.isfinite(out.loss))])[0] > 0
                engine.backward(out.loss * weight if finite else _zero_loss(engine.model))
            tokens += n_tokens
        engine.step()
        return {"tokens": tokens, "loss": metrics["loss"]}

    return lm, step


def _trl_side(path: str, pairs: list[dict], tokenizer, batch: int, beta: float, lr: float, precompute: bool,
              total_steps: int, outdir: str, slot):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.text import render_prompt

    policy = common.load_model(path, train=True)
    ref_model = None if precompute else common.load_model(path, train=False)
    # TRL tokenizes its own dataset at init (and precomputes reference log-probs over it); the timed steps below
    # feed it our token ids through its own collator, so both sides train on identical tokens.
    data = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"], None, None),
                               "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs])
    args = DPOConfig(
        output_dir=outdir, per_device_train_batch_size=batch, beta=beta, loss_type=["sigmoid"], learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0,
        max_length=None, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=batch, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        max_steps=total_steps,
    )
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=data,
                             processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
    # Set by Trainer.train's inner loop; training_step divides the loss by it (one micro-batch per step here).
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    if precompute:
        ref_c = trainer.train_dataset["ref_chosen_logps"]
        ref_r = trainer.train_dataset["ref_rejected_logps"]
    collator = trainer.data_collator

    def step(i: int) -> dict:
        examples = []
        for j in slot(i):
            ex = {k: pairs[j][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            if precompute:
                ex["ref_chosen_logps"], ex["ref_rejected_logps"] = ref_c[j], ref_r[j]
            examples.append(ex)
        inputs = collator(examples)
        loss = common.trl_step(trainer, model, inputs)
        return {"tokens": int(inputs["attention_mask"].sum()), "loss": float(loss),
                "shape": list(inputs["input_ids"].shape)}

    return model, step, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="discarded steps per side, before the timed ones")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (one micro-batch: 2x sequences)")
    p.add_argument("--warmup-batch-size", type=int, default=None,
                   help="pairs in each warm-up step (default: --batch-size); warm-up only triggers lazy init "
                        "(allocator, AdamW state), so a smaller one saves minutes on a 2-core machine")
    p.add_argument("--completion-tokens", type=int, default=40)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default="ours,trl_precompute,trl_ref")
    args = p.parse_args()

    common.set_threads(args.threads)
    sides = args.sides.split(",")
    rounds = args.warmup + args.steps
    tokenizer, path = common.load_tokenizer_and_path()
    pairs = common.build_pairs(tokenizer, args.batch_size * rounds, args.completion_tokens)
    warm_b = min(args.warmup_batch_size or args.batch_size, args.batch_size)

    def slot(i: int) -> range:
        # Step i of every side trains on the same pairs: its slot of --batch-size pairs (cut for warm-up steps).
        return range(i * args.batch_size, i * args.batch_size + (warm_b if i < args.warmup else args.batch_size))

    peak_before = common.matmul_peak_gflops(threads=args.threads)
    common.log(f"matmul peak {peak_before['best_gflops']:.1f} GFLOP/s; load {common.load_average()}")

    steps, params, extra = {}, None, {}
    with tempfile.TemporaryDirectory() as tmp:
        if "ours" in sides:
            model, steps["ours"] = _our_side(path, pairs, tokenizer, args.batch_size, args.beta, args.lr, slot)
            params = common.n_params(model)
        import trl

        extra["trl"] = trl.__version__
        for side in ("trl_precompute", "trl_ref"):
            if side in sides:
                start = time.perf_counter()
                model, steps[side], _ = _trl_side(path, pairs, tokenizer, args.batch_size, args.beta, args.lr,
                                                  side == "trl_precompute", rounds, f"{tmp}/{side}", slot)
                extra[f"{side}_init_s"] = time.perf_counter() - start
                params = params or common.n_params(model)
        common.log(f"set up {list(steps)}; {params / 1e6:.1f}M parameters; load {common.load_average()}")

        times, cpu, info = common.alternate(steps, rounds)
    peak_after = common.matmul_peak_gflops(threads=args.threads)
    peak = max(peak_before["best_gflops"], peak_after["best_gflops"])

    from dpo_ray import logprobs

    shares_prompt = hasattr(logprobs, "SequenceScorer")
    results = {}
    for side in steps:
        s = common.summarize(times[side], args.warmup, cpu[side])
        kept = range(args.warmup, rounds) if args.warmup < rounds else range(rounds)
        tokens = statistics.mean(info[side][i]["tokens"] for i in kept)
        # Tokens the side's forward actually runs: ours scores each prompt once (KV cache shared by chosen and
        # rejected) since the prompt-sharing change; TRL runs prompt+chosen and prompt+rejected.
        batches = [[pairs[j] for j in slot(i)] for i in kept]
        executed = statistics.mean(
            sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in b)
            if side == "ours" and shares_prompt else common.pair_tokens(b) for b in batches)
        tps = tokens / s["median_s"]
        results[side] = {**s, "tokens_per_step": tokens, "tokens_per_s": tps,
                         "pairs_per_s": len(slot(rounds - 1)) / s["median_s"],
                         "mfu": 6 * params * tps / (peak * 1e9),
                         "executed_tokens_per_step": executed,
                         "mfu_executed": 6 * params * executed / s["median_s"] / (peak * 1e9),
                         "losses": [x["loss"] for x in info[side]]}
    ratios = {}
    for side in results:
        if side != "ours" and "ours" in results:
            ratios[f"ours/{side}"] = results["ours"]["tokens_per_s"] / results[side]["tokens_per_s"]
            ratios[f"ours/{side}_by_min_step"] = results[side]["min_s"] / results["ours"]["min_s"]
            ratios[f"ours/{side}_by_cpu_s"] = results[side]["cpu_median_s"] / results["ours"]["cpu_median_s"]
    for side, r in results.items():
        common.log(f"{side}: median {r['median_s']:.2f}s/step (min {r['min_s']:.2f}s, cpu {r['cpu_median_s']:.2f}s), "
                   f"{r['tokens_per_s']:.0f} tok/s, {r['pairs_per_s']:.2f} pairs/s, MFU {100 * r['mfu']:.1f}% "
                   f"(executed tokens: {100 * r['mfu_executed']:.1f}%)")
    for k, v in ratios.items():
        common.log(f"{k}: {v:.2f}x")
    path_out = common.write_result("train_throughput", {
        "machine": common.machine_info(), "args": vars(args), "workload": common.describe_pairs(pairs),
        "prompt_sharing": shares_prompt, "parameters": params, "matmul_peak": {"before": peak_before, "after": peak_after, "used_gflops": peak},
        "versions": extra, "results": results, "ratios": ratios,
    })
    common.log(f"wrote {path_out}")


if __name__ == "__main__":
    main()
