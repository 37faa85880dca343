"""Figure 2: the Ray Data reference stage against bare torch.inference_mode() loops over the same pairs.

Sides, alternated within one invocation (ray, scorer, trick, full, ray, ...):
  ray      dpo_ray.stages.reference.run(cfg, pairs_dir, out_dir) on a local ray.init(num_cpus=2) with
           configs/default.yaml: Parquet read, an actor pool whose actor loads the model, LogProbScorer, Parquet
           write and the read-back check. Timed whole, the actor's model load included (it is the stage's cost).
  scorer   the stage's own LogProbScorer called in this process on the same Arrow table: the same scoring code
           (prompt sharing, head-only log-probs, length-sorted batches of reference.batch_size), no Ray, no Parquet.
  trick    a bare loop: torch.inference_mode(), the same length-sorted batches, dpo_ray.logprobs.completion_logps
           on prompt+completion rows (LM head only at completion positions, no materialized log-softmax).
  ray_v2   the ray side with Ray Data's default Parquet reader (datasource V2, which starts footer-reader actors)
           instead of the V1 reader pipeline.init_ray selects: what that choice is worth.
  full     the textbook scorer in the same loop: model(...).logits at every position, full log_softmax, gather,
           sum over completion tokens.
The in-process sides load their model once, outside the timing (load time reported apart). So ray/scorer - 1 is
what Ray Data, Parquet and the actor's model load add; trick/scorer what prompt sharing saves; full/trick what the
head-only log-prob trick saves. Tokens = non-padding tokens of prompt+chosen and prompt+rejected (the prompt counted
twice, as a scorer without prompt sharing runs it), the same count for every side.

    .venv-bench/bin/python benchmarks/reference_pass.py --pairs 64 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common

COLUMNS = {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}


def _jobs(pairs: list[dict]) -> list[tuple[int, str, list[int], list[int]]]:
    # One row per (pair, side), sorted by total length, as the pre-sharing LogProbScorer batched them.
    jobs = [(row, col, r["prompt_ids"], r[col]) for col in COLUMNS for row, r in enumerate(pairs)]
    jobs.sort(key=lambda j: len(j[2]) + len(j[3]))
    return jobs


def full_logits_logps(model, input_ids, attention_mask, completion_mask):
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)


def bare_pass(model, pairs, pad_id: int, batch_size: int, scorer: str) -> dict[str, list[float]]:
    """Sequences (not pairs) per forward: batch_size rows, as reference.batch_size meant before prompt sharing."""
    from dpo_ray.logprobs import completion_logps, pad_batch

    out = {col: [math.nan] * len(pairs) for col in COLUMNS}
    jobs = _jobs(pairs)
    with torch.inference_mode():
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s : s + batch_size]
            t = pad_batch([j[2] for j in chunk], [j[3] for j in chunk], pad_id)
            sums = completion_logps(model, **t)[0] if scorer == "trick" else full_logits_logps(model, **t)
            for (row, col, _, _), v in zip(chunk, sums.tolist()):
                out[col][row] = v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="rounds of the sides, alternated")
    p.add_argument("--completion-tokens", type=int, default=40)
    p.add_argument("--config", default=str(common.ROOT / "configs" / "default.yaml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default="ray,scorer,trick,full")
    args = p.parse_args()

    import pyarrow.parquet as pq
    import ray

    from dpo_ray import schemas
    from dpo_ray.config import load_config
    from dpo_ray.cluster import init_ray

    common.set_threads(args.threads)
    sides = args.sides.split(",")
    tokenizer, path = common.load_tokenizer_and_path()
    pairs = common.build_pairs(tokenizer, args.pairs, args.completion_tokens)
    tokens = common.pair_tokens(pairs)
    # The Ray actor uses run.torch_threads: the same thread count as the in-process sides.
    # reference.cache=false: every round must score every pair, not read the previous round's results.
    cfg = load_config(args.config, [f"model.policy={path}", f"run.torch_threads={args.threads}",
                                    "reference.cache=false"])
    work = Path(tempfile.mkdtemp(prefix="bench-reference-"))
    pairs_dir = work / "pairs"
    pairs_dir.mkdir()
    pq.write_table(schemas.rows_to_table(pairs, schemas.PAIRS), pairs_dir / "part-0.parquet")
    if cfg.reference.num_actors != 1:
        common.log(f"note: reference.num_actors={cfg.reference.num_actors}")

    from dpo_ray.ops.scorers import LogProbScorer, ScorerSpec

    table = schemas.rows_to_table(pairs, schemas.PAIRS)
    start = time.perf_counter()
    model = common.load_model(path)
    load_s = time.perf_counter() - start
    common.log(f"{len(pairs)} pairs, {tokens} tokens, reference.batch_size {cfg.reference.batch_size}; "
               f"bare model load {load_s:.1f}s; load {common.load_average()}")
    if "ray" in sides or "ray_v2" in sides:
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("DPO_RAY_CACHE", "HF_HOME") if k in os.environ}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        init_ray(cfg)  # the cluster is up; this applies the pipeline's own Ray Data settings and resource check
        common.log(f"ray.init {time.perf_counter() - start:.1f}s (not counted)")
    # After ray.init: the scorer asks Ray for its GPU ids, which starts a default cluster if none is up.
    scorer = LogProbScorer(ScorerSpec.of(cfg, path, COLUMNS)) if "scorer" in sides else None

    from dpo_ray.runner import StageContext
    from dpo_ray.stages.reference import run

    times = {s: [] for s in sides}
    cpu = {s: [] for s in sides}
    values = {}
    try:
        for i in range(args.repeats):
            for side in sides:
                start, cpu0 = time.perf_counter(), time.process_time()
                if side in ("ray", "ray_v2"):
                    out_dir = work / f"ref-{i}"
                    context = ray.data.DataContext.get_current()
                    chosen_reader, context.use_datasource_v2 = context.use_datasource_v2, side == "ray_v2"
                    try:
                        stats = run(StageContext(cfg, out_dir, {"pairs": pairs_dir}))
                    finally:
                        context.use_datasource_v2 = chosen_reader
                    elapsed = time.perf_counter() - start
                    by_id = {r["pair_id"]: r for r in pq.read_table(out_dir).to_pylist()}
                    values[side] = {"chosen_ids": [by_id[r["pair_id"]]["ref_chosen_logps"] for r in pairs],
                                    "rejected_ids": [by_id[r["pair_id"]]["ref_rejected_logps"] for r in pairs]}
                    shutil.rmtree(out_dir, ignore_errors=True)
                    assert stats["nonfinite_pairs"] == 0, stats
                elif side == "scorer":
                    scored = scorer(table)
                    elapsed = time.perf_counter() - start
                    values[side] = {col: scored[out].to_pylist() for col, out in COLUMNS.items()}
                else:
                    values[side] = bare_pass(model, pairs, tokenizer.pad_token_id, cfg.reference.batch_size, side)
                    elapsed = time.perf_counter() - start
                times[side].append(elapsed)
                # For the ray side this is only the driver's CPU time (the actor's is not in this process).
                cpu[side].append(time.process_time() - cpu0)
                common.log(f"round {i} {side}: {elapsed:.1f}s wall, {cpu[side][-1]:.1f}s cpu in this process "
                           f"({tokens / elapsed:.0f} tok/s); "
                           f"load {common.load_average()}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for side in sides:
        med = statistics.median(times[side])
        results[side] = {"all_s": [round(t, 3) for t in times[side]], "median_s": med, "min_s": min(times[side]),
                         "process_cpu_s": [round(t, 3) for t in cpu[side]],
                         "tokens_per_s": tokens / med, "pairs_per_s": len(pairs) / med}
    base = "scorer" if "scorer" in results else next((x for x in ("trick", "full") if x in results), None)
    ratios = {}
    for a, b in (("ray", "scorer"), ("ray", "trick"), ("ray_v2", "ray"), ("trick", "scorer"), ("full", "trick"),
                 ("full", "scorer"), ("ray", "full")):
        if a in results and b in results:
            ratios[f"{a}/{b}_time"] = results[a]["median_s"] / results[b]["median_s"]
    if "ray/trick_time" in ratios:  # the goal: the stage against a bare inference_mode loop, at most +10%
        ratios["ray_vs_bare_loop_pct"] = 100 * (ratios["ray/trick_time"] - 1)
    if "ray" in results and "scorer" in results:
        ratios["ray_overhead_pct"] = 100 * (ratios["ray/scorer_time"] - 1)
        ratios["ray_overhead_pct_vs_scorer_plus_model_load"] = 100 * (
            results["ray"]["median_s"] / (results["scorer"]["median_s"] + load_s) - 1)
    # The sides must agree on the numbers, or the comparison means nothing.
    agreement = {}
    ref = values.get(base) if base else None
    for side, v in values.items():
        if ref is not None and side != base:
            agreement[side] = max(abs(a - b) for col in v for a, b in zip(v[col], ref[col]))
    for side, r in results.items():
        common.log(f"{side}: median {r['median_s']:.1f}s, {r['tokens_per_s']:.0f} tok/s")
    common.log(f"ratios {ratios}; max |logp diff| vs {base} {agreement}")
    out = common.write_result("reference_pass", {
        "machine": common.machine_info(), "args": vars(args), "workload": {**common.describe_pairs(pairs),
                                                                              "tokens": tokens},
        "reference_batch_size": cfg.reference.batch_size, "bare_model_load_s": load_s,
        "results": results, "ratios": ratios, "agreement_base": base, "max_abs_logp_diff": agreement,
    })
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
