"""Figure 3: sampling throughput of the transformers backend against Hugging Face generate, interleaved.

Sides (same model in one process, fp32, the same P prompts x n samples, temperature 1, top-p 1, no top-k):
  ours  dpo_ray.stages.sample.sample_tokens, called as TransformersSampler.generate calls it (P prompts and n when
        it takes n, else each prompt repeated n times), one seeded torch.Generator per (prompt, sample).
  hf    model.generate(do_sample=True, num_return_sequences=n, top_k=0) on the left-padded batch of the P prompts.
By default EOS is ignored on both sides (--respect-eos to stop at it), so both generate exactly P*n*max_new_tokens
tokens and the comparison is of equal work; with --respect-eos the generated tokens up to and including EOS count.
Tokens/s = generated tokens / wall time of the call (prefill included). Sampling is not bit-identical between the
sides (different random streams), only the work is the same.

    .venv-bench/bin/python benchmarks/sampling.py --prompts 16 --n 4 --max-new-tokens 40 --repeats 2
"""

from __future__ import annotations

import argparse
import inspect
import statistics

import torch

import common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (ours, hf); the first is also timed")
    p.add_argument("--warmup", type=int, default=0, help="rounds discarded from the median")
    p.add_argument("--respect-eos", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from transformers import GenerationConfig

    from dpo_ray.logprobs import pad_batch
    from dpo_ray.sampling import sample_seed, sample_tokens

    common.set_threads(args.threads)
    tokenizer, path = common.load_tokenizer_and_path()
    model = common.load_model(path)
    model.config.use_cache = True
    prompts = common.read_prompts(args.prompts)
    ids = common.prompt_ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None}
    if not args.respect_eos:
        eos_ids_used = set()
    else:
        eos_ids_used = eos_ids
    rows = [(pid, r["id"], j) for pid, r in zip(ids, prompts) for j in range(args.n)]
    left = pad_batch(ids, [[] for _ in ids], pad, side="left")
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.n, pad_token_id=pad,
        eos_token_id=sorted(eos_ids) if args.respect_eos else None,
    )
    common.log(f"{len(rows)} sequences ({args.prompts} prompts x {args.n}), {args.max_new_tokens} new tokens, "
               f"prompt tokens {sum(map(len, ids))}; load {common.load_average()}")

    seeds = lambda i: [sample_seed(i, key, j) for _, key, j in rows]  # noqa: E731
    if "n" in inspect.signature(sample_tokens).parameters:
        # sample_tokens(model, prompts, seeds, n, ...): one prefill per prompt, n samples from its KV cache.
        call = lambda i: sample_tokens(model, ids, seeds(i), args.n, args.max_new_tokens, 1.0, 1.0,  # noqa: E731
                                       eos_ids_used, pad)
    else:
        # Older signature: one row per (prompt, sample), as TransformersSampler.generate then called it.
        call = lambda i: sample_tokens(model, [r[0] for r in rows], seeds(i), args.max_new_tokens,  # noqa: E731
                                       1.0, 1.0, eos_ids_used, pad)

    def ours(i: int) -> int:
        return sum(len(t) for t, _, _ in call(i))

    def hf(i: int) -> int:
        torch.manual_seed(i)
        with torch.inference_mode():
            out = model.generate(input_ids=left["input_ids"], attention_mask=left["attention_mask"],
                                 generation_config=gen_cfg)
        new = out[:, left["input_ids"].shape[1]:]
        if not args.respect_eos:
            return new.numel()
        total = 0
        for row in new.tolist():
            stop = next((k for k, t in enumerate(row) if t in eos_ids), None)
            total += len(row) if stop is None else stop + 1
        return total

    sides = {"ours": ours, "hf": hf}
    times, cpu, tokens = common.alternate(sides, args.repeats)

    results = {}
    for side in sides:
        keep = slice(args.warmup, None) if args.warmup < args.repeats else slice(None)
        rates = [n / t for n, t in zip(tokens[side][keep], times[side][keep])]
        results[side] = {"all_s": [round(t, 3) for t in times[side]], "cpu_s": [round(t, 3) for t in cpu[side]],
                         "tokens": tokens[side],
                         "median_s": statistics.median(times[side][keep]), "tokens_per_s": statistics.median(rates)}
    ratio = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    cpu_ratio = statistics.median(cpu["hf"]) / statistics.median(cpu["ours"])
    for side, r in results.items():
        common.log(f"{side}: {r['tokens_per_s']:.0f} generated tok/s (median {r['median_s']:.1f}s)")
    common.log(f"ours/hf: {ratio:.2f}x (by CPU seconds {cpu_ratio:.2f}x)")
    out = common.write_result("sampling", {
        "machine": common.machine_info(), "args": vars(args), "sequences": len(rows),
        "prompt_tokens": sum(map(len, ids)), "results": results, "ratios": {"ours/hf": ratio, "ours/hf_by_cpu_s": cpu_ratio},
    })
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
