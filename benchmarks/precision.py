"""model.dtype float32 against bf16-mixed (float32 weights, bf16 matmuls under torch.autocast), what `auto` picks
on CPUs with AMX or AVX512-BF16: the train step, the reference pass and sampling, alternately in one process.

Sides, each on the default model (SmolLM2-135M-Instruct, real weights) and the same inputs:
  train      dpo_forward + backward + AdamW (lr 1e-5, the default's) on the same batches of `--batch-size` pairs;
             each side trains its own copy from the same weights, so the losses of the first steps compare the
             two precisions' optimization, not only one forward.
  reference  the reference stage's scoring (shared_prompt_logps, inference mode) over `--pairs` pairs in batches
             of 16 pairs (reference.batch_size); also how far bf16-mixed's log-probs and DPO margins are from
             float32's.
  sample     the sampler's loop (sample_tokens: prefill once, KV cache, top-p) for `--prompts` prompts x 4, up to
             `--new-tokens` tokens, the default's temperature and top_p: float32 (what bf16-mixed samples in, since
             models.inference_dtype), bf16 weights, and bf16 autocast on float32 weights. Tokens/s counts the tokens
             generated.
A peer here is the float32 side: the question is what the CPU's bf16 units are worth to the same code.

    .venv/bin/python benchmarks/precision.py                      # SmolLM2, the numbers in benchmarks/README.md
    BENCH_MODEL=builtin:tiny-llama .venv/bin/python benchmarks/precision.py --steps 2 --pairs 8 --prompts 2
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import common

SIDES = ("float32", "bf16-mixed")


def train_side(model, dtype: str, batches: list[dict], pad_id: int):
    from dpo_ray.config import load_config
    from dpo_ray.logprobs import SequenceScorer
    from dpo_ray.stages.train import dpo_forward

    t = load_config(None, ["model.dtype=float32"]).train
    scorer = SequenceScorer(model, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)

    def step(i: int) -> float:
        out, _, _ = dpo_forward(scorer, batches[i], pad_id, t)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return round(out.loss.item(), 6)

    return step


def reference_side(model, dtype: str, pairs: list[dict], pad_id: int, batch_pairs: int = 16):
    from dpo_ray.logprobs import precision, shared_prompt_batch, shared_prompt_logps

    @torch.inference_mode()
    def score(_: int) -> list[float]:
        sums = []
        for start in range(0, len(pairs), batch_pairs):
            rows = pairs[start : start + batch_pairs]
            batch = shared_prompt_batch([r["prompt_ids"] for r in rows],
                                        [(r["chosen_ids"], r["rejected_ids"]) for r in rows], pad_id)
            with precision(dtype, torch.device("cpu")):
                sums += shared_prompt_logps(model, **batch)[0].tolist()
        return sums

    return score


def sample_side(model, autocast: bool, prompts: list[list[int]], new_tokens: int, eos_ids: set[int], pad_id: int):
    from dpo_ray.logprobs import precision
    from dpo_ray.sampling import sample_tokens

    def sample(i: int) -> int:
        seeds = [1000 * i + j for j in range(4 * len(prompts))]
        with precision("bf16-mixed" if autocast else "float32", torch.device("cpu")):
            rows = sample_tokens(model, prompts, seeds, 4, new_tokens, 1.0, 0.95, eos_ids, pad_id)
        return sum(len(ids) for ids, _, _ in rows)

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per train step (train.batch_size)")
    parser.add_argument("--steps", type=int, default=4, help="train steps per side (the first is warm-up)")
    parser.add_argument("--pairs", type=int, default=64, help="pairs of the reference pass")
    parser.add_argument("--prompts", type=int, default=8, help="prompts sampled (x4 completions)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the reference and sample sides")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    common.set_threads(args.threads)
    from dpo_ray.config import bf16_matmul_units
    from dpo_ray.models import inference_dtype

    tokenizer, path = common.load_tokenizer_and_path()
    pad_id = tokenizer.pad_token_id
    result: dict = {"machine": common.machine_info(), "bf16_matmul_units": bf16_matmul_units(),
                    "model": common.MODEL, "args": vars(args)}
    common.log(f"machine {result['machine']['cpu']}, bf16 units {result['bf16_matmul_units']}")

    pairs = common.build_pairs(tokenizer, max(args.pairs, args.batch_size * args.steps))
    batches = [{k: [r[k] for r in pairs[i * args.batch_size : (i + 1) * args.batch_size]]
                for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(args.steps)]
    base = common.load_model(path)
    policy = {side: copy.deepcopy(base) for side in SIDES}
    for side in SIDES:
        policy[side].config.use_cache = True
    # Step 0's reference log-probs (float32, the same for both sides): the loss starts at log 2 on both.
    ref = reference_side(base, "float32", pairs, pad_id)(0)
    for i, batch in enumerate(batches):
        rows = range(i * args.batch_size, (i + 1) * args.batch_size)
        batch["ref_chosen_logps"] = [ref[2 * r] for r in rows]
        batch["ref_rejected_logps"] = [ref[2 * r + 1] for r in rows]
    times, cpu, losses = common.alternate(
        {side: train_side(policy[side], side, batches, pad_id) for side in SIDES}, args.steps)
    train_tokens = common.pair_tokens(pairs[: args.batch_size])
    result["train"] = {side: {**common.summarize(times[side], 1, cpu[side]), "losses": losses[side],
                              "tokens_per_step": train_tokens} for side in SIDES}
    del policy

    base.config.use_cache = True
    scored_pairs = pairs[: args.pairs]
    times, cpu, sums = common.alternate(
        {side: reference_side(base, side, scored_pairs, pad_id) for side in SIDES}, args.repeats)
    exact, mixed = sums["float32"][0], sums["bf16-mixed"][0]
    gaps = [abs(a - b) for a, b in zip(exact, mixed)]
    margin_gaps = [abs((exact[i] - exact[i + 1]) - (mixed[i] - mixed[i + 1])) for i in range(0, len(exact), 2)]
    result["reference"] = {side: common.summarize(times[side], 1, cpu[side]) for side in SIDES}
    result["reference"]["tokens"] = common.pair_tokens(scored_pairs)
    result["reference"]["logp_gap"] = {"mean_abs": statistics.mean(gaps), "max_abs": max(gaps),
                                       "sequence_logp_mean": statistics.mean(exact)}
    result["reference"]["margin_gap"] = {"mean_abs": statistics.mean(margin_gaps), "max_abs": max(margin_gaps)}

    prompts = common.prompt_ids(tokenizer, common.read_prompts(args.prompts, seed=1))
    eos_ids = {tokenizer.eos_token_id}
    # bf16-mixed samples in float32 (models.inference_dtype): what bf16 weights or bf16 autocast would gain there.
    assert inference_dtype("bf16-mixed") == "float32"
    samplers = {"float32": sample_side(base, False, prompts, args.new_tokens, eos_ids, pad_id),
                "bf16-weights": sample_side(copy.deepcopy(base).to(torch.bfloat16), False, prompts, args.new_tokens,
                                          eos_ids, pad_id),
                "bf16-autocast": sample_side(base, True, prompts, args.new_tokens, eos_ids, pad_id)}
    times, cpu, generated = common.alternate(samplers, args.repeats)
    result["sample"] = {side: {**common.summarize(times[side], 1, cpu[side]), "tokens": generated[side]}
                        for side in samplers}

    def tokens_per_s(side: str) -> float:
        return statistics.mean(generated[side][1:] or generated[side]) / result["sample"][side]["median_s"]

    ratios = {
        "train_step": result["train"]["float32"]["median_s"] / result["train"]["bf16-mixed"]["median_s"],
        "reference_pass": result["reference"]["float32"]["median_s"] / result["reference"]["bf16-mixed"]["median_s"],
        "sample_tokens_per_s_on_bf16_weights": tokens_per_s("bf16-weights") / tokens_per_s("float32"),
        "sample_tokens_per_s_under_autocast": tokens_per_s("bf16-autocast") / tokens_per_s("float32"),
    }
    result["speedup_bf16_mixed_over_float32"] = ratios
    common.log(f"train losses: float32 {losses['float32']}, bf16-mixed {losses['bf16-mixed']}")
    reference = result["reference"]
    common.log(f"reference log-prob gap {reference['logp_gap']}, margin gap {reference['margin_gap']}")
    common.log("bf16-mixed over float32: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    common.log(f"wrote {common.write_result('precision', result)}")


if __name__ == "__main__":
    main()
