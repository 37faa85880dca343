"""Does torch.compile buy back the train step's non-matmul time? (issue 20 item 5; a probe, not a feature)

profile_train_step.py found float32's step at ~50% executed MFU with its matmuls at ~74% of the fp32 peak and
~17% of the step in elementwise operators (RMSNorm, SiLU, RoPE, residual adds) that Inductor could fuse. This
builds two copies of the train step exactly as train_throughput.py's `ours` side (dpo_forward + backward + clip +
fused AdamW through the DDPEngine, same initial weights) and compiles parts of one of them in place:
  norm-mlp  every RMSNorm and every MLP (gate/up/down projections with the SiLU and product between them)
  layers    every whole decoder layer (attention included; the KV cache of the shared prompt may break graphs)
with dynamic shapes, so the padded lengths of other batches do not recompile. The two steps then alternate on the
same batches (eager, compiled, eager, ...); the first --warmup rounds (compilation) are discarded. Reported: the
median step of each, their ratio, each step's executed MFU (3x the forward FLOP on every token the forward runs,
padding included, against the fp32 matmul peak measured in the same process), the compile time (first compiled
step minus the eager one) and how far the two sides' losses drift apart.

    .venv/bin/python benchmarks/compile_train_step.py --scope norm-mlp --rounds 5 --warmup 2
"""

from __future__ import annotations

import argparse
import statistics

import common
from train_throughput import build_engine, reference_logps, train_rows


def compile_in_place(lm, scope: str) -> int:
    """Compile the `scope` modules of `lm`'s decoder in place (nn.Module.compile keeps names and state dicts);
    returns how many were compiled."""
    decoder = lm.get_decoder()
    if scope == "layers":
        modules = list(decoder.layers)
    else:
        modules = [decoder.norm, *(m for layer in decoder.layers
                                   for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp))]
    for module in modules:
        module.compile(dynamic=True)
    return len(modules)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--completion-tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="rounds discarded (the first compiles)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scope", choices=("norm-mlp", "layers"), default="norm-mlp")
    p.add_argument("--dtype", choices=("float32", "bf16-mixed"), default="float32", help="model.dtype of the step")
    args = p.parse_args()

    from dpo_ray.config import TrainConfig
    from dpo_ray.stages.train import _micro_batches, dpo_forward

    common.set_threads(args.threads)
    tokenizer, path = common.load_tokenizer_and_path()
    b = args.batch_size
    pairs = common.build_pairs(tokenizer, b * args.rounds, args.completion_tokens)
    ref_c, ref_r = reference_logps(path, pairs)
    t = TrainConfig(beta=0.1, lr=1e-5, batch_size=b, micro_batch_size=b, max_grad_norm=1.0)
    pad = tokenizer.pad_token_id
    sides = {"eager": build_engine(path, t, args.dtype), "compiled": build_engine(path, t, args.dtype)}
    compiled_modules = compile_in_place(sides["compiled"][0], args.scope)
    lm = sides["eager"][0]
    executed = {"decoder_tokens": 0, "head_rows": 0}

    def count_decoder(module, args_, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"][..., 0]
        executed["decoder_tokens"] += x.numel()

    def count_head(module, args_):
        executed["head_rows"] += args_[0].reshape(-1, args_[0].shape[-1]).shape[0]

    for side_lm, _ in sides.values():
        side_lm.get_decoder().register_forward_pre_hook(count_decoder, with_kwargs=True)
        side_lm.get_output_embeddings().register_forward_pre_hook(count_head)

    def step(side: str, i: int) -> dict:
        _, engine = sides[side]
        executed.update(decoder_tokens=0, head_rows=0)
        (micro,) = _micro_batches(train_rows(pairs, ref_c, ref_r, range(i * b, (i + 1) * b)), t.micro_batch_size)
        out, _, _ = dpo_forward(engine.model, micro, pad, t)
        engine.backward(out.loss)
        engine.step()
        return {"loss": float(out.loss),
                "train_flop": 3 * sum(common.forward_flop(lm, executed["decoder_tokens"], executed["head_rows"]))}

    peak = common.matmul_peak_gflops(threads=args.threads)["best_gflops"]
    common.log(f"{compiled_modules} modules compiled ({args.scope}); fp32 matmul peak {peak:.1f} GFLOP/s")
    times, cpu, outputs = common.alternate({side: (lambda i, side=side: step(side, i)) for side in sides},
                                           args.rounds)
    peak_after = common.matmul_peak_gflops(threads=args.threads)["best_gflops"]
    peak = max(peak, peak_after)
    result = {}
    for side in sides:
        mfu = statistics.median(outputs[side][i]["train_flop"] / times[side][i] / 1e9 / peak
                                for i in range(args.warmup, args.rounds))
        result[side] = {**common.summarize(times[side], args.warmup, cpu[side]), "executed_mfu": mfu,
                        "losses": [o["loss"] for o in outputs[side]]}
        common.log(f"{side}: median step {result[side]['median_s']:.2f}s, executed MFU {100 * mfu:.1f}%")
    result["speedup"] = result["eager"]["median_s"] / result["compiled"]["median_s"]
    result["compile_s"] = times["compiled"][0] - times["eager"][0]
    result["max_loss_gap"] = max(abs(a - c) for a, c in zip(result["eager"]["losses"], result["compiled"]["losses"]))
    common.log(f"compiled/eager speed-up {result['speedup']:.3f}x; compiling cost {result['compile_s']:.1f}s; "
               f"losses differ by at most {result['max_loss_gap']:.2e}")
    out = common.write_result("compile_train_step", {
        "machine": common.machine_info(), "args": vars(args), "fp32_matmul_peak_gflops": peak,
        "compiled_modules": compiled_modules, **result})
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
