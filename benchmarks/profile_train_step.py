"""Where one dpo-ray train step spends its time (a diagnostic for Figure 1, not a comparison).

Builds the train step exactly as train_throughput.py's `ours` side (dpo_forward + backward + clip + AdamW through
the DDPEngine), runs one small warm-up step, then one step of --batch-size pairs split into phases:
  batch     building the padded tensors (inside dpo_forward, measured as forward minus the module calls)
  decoder   the transformer body (each call of the decoder module: prompt pass and completion pass when the
            prompt is shared, one pass otherwise)
  lm_head   the LM head matmuls (each call of the output embedding)
  forward   the whole dpo_forward: the remainder over decoder + lm_head is log-softmax/gather, masks and the loss
  backward  loss.backward()
  optimizer clip_grad_norm_ + AdamW step + zero_grad
and, in a second identical step under torch.profiler, the operators with the most self CPU time.
FLOP shares use 2 * parameters per token for the decoder and 2 * hidden * vocab per scored token for the head.

Executed MFU (issue 20 item 5) is the step's model FLOP (3x the forward, on every token it executes, padding
included) per second against the fp32 matmul peak of a 2048x2048 matmul. The profiled step says where the rest
goes: the matmul kernels' share of the step and their own GFLOP/s (the profiler's FLOP count over their self time),
their busiest shapes, each timed again alone on fresh tensors, and everything that is not a matmul. A step can be
no faster than its matmuls at the rate their shapes run at, so `ceiling_mfu` (model FLOP over the matmuls' time
alone) is the executed MFU this step reaches with every other operator free.

    .venv-bench/bin/python benchmarks/profile_train_step.py --batch-size 8 --threads 2 [--dtype bf16-mixed]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from train_throughput import build_engine, reference_logps, train_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--completion-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-profiler", action="store_true", help="skip the torch.profiler step")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--dtype", choices=("float32", "bf16-mixed"), default="float32", help="model.dtype of the step")
    args = p.parse_args()

    from dpo_ray.config import TrainConfig
    from dpo_ray.stages.train import _micro_batches, dpo_forward

    common.set_threads(args.threads)
    tokenizer, path = common.load_tokenizer_and_path()
    b = args.batch_size
    pairs = common.build_pairs(tokenizer, b * 3, args.completion_tokens)
    ref_c, ref_r = reference_logps(path, pairs)
    t = TrainConfig(beta=0.1, lr=1e-5, batch_size=b, micro_batch_size=b, max_grad_norm=1.0)
    lm, engine = build_engine(path, t, args.dtype)
    pad = tokenizer.pad_token_id
    peak = common.matmul_peak_gflops(threads=args.threads)["best_gflops"]
    kernel_dtype = torch.bfloat16 if args.dtype == "bf16-mixed" else torch.float32
    kernel_peak = (peak if kernel_dtype == torch.float32
                   else common.matmul_peak_gflops(threads=args.threads, dtype=kernel_dtype)["best_gflops"])

    calls: dict[str, list[float]] = {"decoder": [], "lm_head": []}
    tokens_seen = {"decoder": 0, "lm_head": 0}

    def hook(name):
        def pre(module, args_, kwargs):
            module._bench_t0 = time.perf_counter()

        def post(module, args_, kwargs, output):
            calls[name].append(time.perf_counter() - module._bench_t0)
            x = kwargs.get("input_ids") if name == "decoder" else (args_[0] if args_ else None)
            if x is not None:
                tokens_seen[name] += x.numel() if name == "decoder" else x.shape[0]
        return pre, post

    for name, module in (("decoder", lm.get_decoder()), ("lm_head", lm.get_output_embeddings())):
        pre, post = hook(name)
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    def step(slot: range) -> dict:
        for v in calls.values():
            v.clear()
        for k in tokens_seen:
            tokens_seen[k] = 0
        phases, cpu = {}, {}
        with common.Clock() as c:
            micro = _micro_batches(train_rows(pairs, ref_c, ref_r, slot), t.micro_batch_size)
            (m,) = micro
            out, _, n_tokens = dpo_forward(engine.model, m, pad, t)
        phases["forward"], cpu["forward"] = c.wall, c.cpu
        with common.Clock() as c:
            engine.backward(out.loss)
        phases["backward"], cpu["backward"] = c.wall, c.cpu
        with common.Clock() as c:
            engine.step()
        phases["optimizer"], cpu["optimizer"] = c.wall, c.cpu
        phases["decoder"] = sum(calls["decoder"])
        phases["lm_head"] = sum(calls["lm_head"])
        phases["forward_rest"] = phases["forward"] - phases["decoder"] - phases["lm_head"]
        return {"phases": phases, "phases_cpu": cpu, "pair_tokens": n_tokens, "decoder_calls": len(calls["decoder"]),
                "decoder_tokens_incl_padding": tokens_seen["decoder"], "head_rows": tokens_seen["lm_head"]}

    step(range(0, 2))  # warm-up: lazy init of the allocator and the AdamW state
    common.log(f"warm-up done; load {common.load_average()}")
    with common.Clock() as total:
        info = step(range(b, 2 * b))
    ph = info["phases"]
    step_s = total.wall
    common.log(f"step of {b} pairs: {step_s:.2f}s wall, {total.cpu:.2f}s cpu; load {common.load_average()}")
    for k in ("forward", "decoder", "lm_head", "forward_rest", "backward", "optimizer"):
        c = info["phases_cpu"].get(k)
        common.log(f"  {k:<12} {ph[k]:7.2f}s wall {100 * ph[k] / step_s:5.1f}%"
                   + (f"   {c:7.2f}s cpu {100 * c / total.cpu:5.1f}%" if c is not None else ""))

    body_flop, head_flop = common.forward_flop(lm, info["decoder_tokens_incl_padding"], info["head_rows"])
    fwd_flop = body_flop + head_flop
    flops = {"forward_flop": fwd_flop, "train_flop_3x": 3 * fwd_flop,
             "head_share_of_flop": head_flop / fwd_flop,
             "achieved_gflops_whole_step": 3 * fwd_flop / step_s / 1e9,
             "decoder_fwd_gflops": body_flop / ph["decoder"] / 1e9 if ph["decoder"] else None,
             "lm_head_fwd_gflops": head_flop / ph["lm_head"] / 1e9 if ph["lm_head"] else None,
             "matmul_peak_gflops": peak, "kernel_dtype_matmul_peak_gflops": kernel_peak,
             "executed_mfu": 3 * fwd_flop / step_s / 1e9 / peak}
    common.log(f"  FLOP: head share {100 * flops['head_share_of_flop']:.1f}% of forward; whole step "
               f"{flops['achieved_gflops_whole_step']:.1f} GFLOP/s of {peak:.1f} fp32 peak "
               f"({kernel_peak:.1f} in {kernel_dtype}): executed MFU {100 * flops['executed_mfu']:.1f}%; decoder fwd "
               f"{flops['decoder_fwd_gflops'] or 0:.1f}, head fwd {flops['lm_head_fwd_gflops'] or 0:.1f} GFLOP/s")

    table = ""
    top = []
    if not args.no_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
            step(range(2 * b, 3 * b))
        averages = prof.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(table)
        total_self = sum(e.self_cpu_time_total for e in averages) or 1
        for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            top.append({"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                        "share": e.self_cpu_time_total / total_self})
        groups = {"matmul (mm/addmm/bmm/linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
                  "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
                  "softmax/logsumexp": ("aten::logsumexp", "aten::_log_softmax", "aten::_softmax", "aten::exp"),
                  "elementwise mul/add/silu/pow/rsqrt": ("aten::mul", "aten::add", "aten::silu", "aten::pow",
                                                        "aten::rsqrt", "aten::mean", "aten::neg", "aten::sub",
                                                        "aten::div", "aten::silu_backward"),
                  "copies/cat/index": ("aten::copy_", "aten::cat", "aten::index", "aten::index_put",
                                       "aten::gather", "aten::masked", "aten::repeat_interleave", "aten::clone",
                                       "aten::fill_", "aten::zero_", "aten::index_add", "aten::scatter",
                                       "aten::nonzero", "aten::where")}
        shares = {}
        for g, prefixes in groups.items():
            shares[g] = sum(e.self_cpu_time_total for e in averages if e.key.startswith(prefixes)) / total_self
        shares["other"] = 1 - sum(shares.values())
        common.log("self-CPU share by operator group: " + ", ".join(f"{g} {100 * v:.1f}%" for g, v in shares.items()))
        top.append({"groups": shares})
        flops["where_the_rest_goes"] = matmul_accounting(prof, groups["matmul (mm/addmm/bmm/linear)"], total_self,
                                                         3 * fwd_flop, peak, kernel_peak, kernel_dtype)

    out = common.write_result("profile_train_step", {
        "machine": common.machine_info(), "args": vars(args), "workload": common.describe_pairs(pairs[b:2 * b]),
        "step_wall_s": step_s, "step_cpu_s": total.cpu, **info, "flops": flops, "profiler_top": top,
        "profiler_table": table,
    })
    common.log(f"wrote {out}")


def _time_alone(shape: tuple, dtype: torch.dtype, repeats: int = 20) -> float:
    """Median seconds of one matmul of profiled input `shape` ((M, K), (K, N), a leading bias for addmm, a leading
    batch for bmm) on fresh contiguous tensors."""
    *_, a_shape, b_shape = shape
    a, b = torch.randn(*a_shape).to(dtype), torch.randn(*b_shape).to(dtype)
    fn = torch.bmm if len(a_shape) == 3 else torch.mm
    return statistics.median(common.call_times(lambda: fn(a, b), warmup=3, repeats=repeats))


def matmul_accounting(prof, matmul_ops: tuple, total_self_us: float, model_flop: float, fp32_peak: float,
                      dtype_peak: float, dtype: torch.dtype, top: int = 8) -> dict:
    """Split the profiled step into its matmul kernels (time, FLOP, rate, busiest shapes) and everything else."""
    mm = [e for e in prof.key_averages() if e.key.startswith(matmul_ops) and e.self_cpu_time_total > 0]
    mm_s = sum(e.self_cpu_time_total for e in mm) / 1e6
    mm_flop = sum(e.flops for e in mm)
    mm_share = mm_s / (total_self_us / 1e6)
    rate = mm_flop / mm_s / 1e9
    shapes = []
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.key.startswith(matmul_ops) and e.flops and e.self_cpu_time_total > 0]
    for e in sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[:top]:
        shape = tuple(tuple(s) for s in e.input_shapes if s)
        in_step = e.flops / (e.self_cpu_time_total / 1e6) / 1e9
        alone = e.flops / e.count / _time_alone(shape, dtype) / 1e9
        shapes.append({"op": e.key, "shape": shape, "calls": e.count, "share_of_matmul_time":
                       e.self_cpu_time_total / 1e6 / mm_s, "gflops_in_step": in_step, "gflops_alone": alone})
    out = {"matmul_share_of_step": mm_share, "matmul_gflops": rate, "matmul_of_fp32_peak": rate / fp32_peak,
           "matmul_of_its_dtype_peak": rate / dtype_peak,
           "profiled_matmul_flop_over_model_flop": mm_flop / model_flop,
           "non_matmul_share_of_step": 1 - mm_share,
           "ceiling_mfu": model_flop / mm_s / 1e9 / fp32_peak, "busiest_shapes": shapes}
    common.log(f"matmul kernels: {100 * mm_share:.1f}% of the profiled step at {rate:.1f} GFLOP/s "
               f"({100 * out['matmul_of_fp32_peak']:.1f}% of the fp32 peak, "
               f"{100 * out['matmul_of_its_dtype_peak']:.1f}% of the {dtype} peak; they count "
               f"{100 * out['profiled_matmul_flop_over_model_flop']:.0f}% of the model FLOP); with every other "
               f"operator free the step would reach {100 * out['ceiling_mfu']:.1f}% executed MFU")
    for s in shapes:
        common.log(f"  {s['op']:<12} {str(s['shape']):<44} x{s['calls']:<4} {100 * s['share_of_matmul_time']:5.1f}%"
                   f" of matmul time: {s['gflops_in_step']:6.1f} GFLOP/s in the step, {s['gflops_alone']:6.1f} alone")
    return out


if __name__ == "__main__":
    main()
