"""The reference cache at scale: the reference stage at a full cache hit while the cache holds few or many other
sequences, for this code and for a baseline checkout (before 2026-12-06 every scorer actor and the driver loaded
the whole cache into a dict; now the stage looks up only its own sequences and hands the matches to the actors).

Pairs: --pairs synthetic pairs of random token ids. The cache holds every one of their 2 x pairs sequences (so no
forward runs; the model, tiny-llama, only loads) plus --extra other sequences, in files of 100k rows as many rounds
would leave them. Each (code, extra) case runs the stage from the CLI, its own local Ray cluster, while
scaling.TreeMemory polls the driver's and the largest Ray worker's resident memory (the scorer actor); the cases
alternate code versions. In this process, ReferenceCache.lookup of the pairs' keys is timed against each cache:
the lookup's throughput in cached sequences scanned per second.

    git worktree add /tmp/dpo-old <commit>
    .venv/bin/python benchmarks/reference_cache.py --baseline /tmp/dpo-old
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

import common
from scaling import TreeMemory

FILE_ROWS = 100_000


def _random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def write_pairs(folder: Path, n: int, seed: int = 0) -> list[bytes]:
    """n pairs (schemas.PAIRS) of random ids; returns the keys of their 2n sequences."""
    from dpo_ray import schemas
    from dpo_ray.ops.scorers import sequence_key

    rng = random.Random(seed)
    rows = [{"pair_id": f"p{i}", "prompt_id": f"q{i}", "prompt": "p", "prompt_ids": _random_ids(rng, 24),
             "chosen": "c", "chosen_ids": _random_ids(rng, 24), "rejected": "r", "rejected_ids": _random_ids(rng, 24),
             "chosen_reward": 1.0, "rejected_reward": 0.0} for i in range(n)]
    folder.mkdir(parents=True)
    pq.write_table(schemas.rows_to_table(rows, schemas.PAIRS), folder / "part-0.parquet")
    return [sequence_key(r["prompt_ids"], r[side]) for r in rows for side in ("chosen_ids", "rejected_ids")]


def write_cache(folder: Path, keys: list[bytes], extra: int, seed: int = 1) -> None:
    """`keys` and `extra` random others, shuffled into files of FILE_ROWS rows."""
    from dpo_ray.ops.scorers import ReferenceCache

    rng = random.Random(seed)
    everything = keys + [rng.randbytes(16) for _ in range(extra)]
    rng.shuffle(everything)
    cache = ReferenceCache(folder)
    for start in range(0, len(everything), FILE_ROWS):
        chunk = everything[start : start + FILE_ROWS]
        cache.add(chunk, [-float(len(k)) for k in chunk], f"part-{start // FILE_ROWS:04d}")


def time_lookup(folder: Path, keys: list[bytes]) -> dict:
    from dpo_ray.ops.scorers import ReferenceCache

    cached = sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))
    started = time.perf_counter()
    found = ReferenceCache(folder).lookup(keys)
    seconds = time.perf_counter() - started
    assert found.num_rows == len(set(keys)), (found.num_rows, len(set(keys)))
    return {"cached": cached, "lookup_s": seconds, "cached_per_s": cached / seconds, "found": found.num_rows}


def run_stage(code: Path, pairs: Path, out: Path, root: Path) -> dict:
    cmd = [sys.executable, "-m", "dpo_ray.cli", "reference", "--config", str(common.ROOT / "configs" / "tiny.yaml"),
           "--pairs", str(pairs), "--out", str(out), f"run.root={root}", f"run.tracking_uri=sqlite:///{root}/mlflow.db"]
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(code)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(proc.pid) as memory:
        output, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"reference stage of {code} failed ({proc.returncode}):\n{output[-3000:]}")
    from dpo_ray.artifacts import read_manifest

    stats = read_manifest(out)["stats"]
    mib = {k: (round(v / 2**20) if k != "worker_name" else v) for k, v in memory.peak.items()}
    return {"wall_s": wall, "peak_mib": mib, "pairs": stats["pairs"], "pairs_from_cache": stats["pairs_from_cache"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--extra", default="10000,1000000", help="other cached sequences, one case each")
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (git worktree)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from dpo_ray.config import load_config
    from dpo_ray.ops.scorers import ReferenceCache

    codes = {"this": common.ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo-refcache-") as tmp:
        tmp = Path(tmp)
        keys = write_pairs(tmp / "pairs", args.pairs)
        for extra in [int(x) for x in args.extra.split(",")]:
            root = tmp / f"extra{extra}"
            cfg = load_config(str(common.ROOT / "configs" / "tiny.yaml"), [f"run.root={root}"])
            write_cache(ReferenceCache.of(cfg).folder, keys, extra)
            lookup = time_lookup(ReferenceCache.of(cfg).folder, keys)
            common.log(f"extra {extra}: lookup of {len(keys)} keys in {lookup['cached']} cached: "
                       f"{lookup['lookup_s']:.2f} s")
            for name, code in codes.items():
                row = {"code": name, "extra": extra, **lookup,
                       **run_stage(code, tmp / "pairs", root / f"out-{name}", root)}
                if row["pairs_from_cache"] != args.pairs:
                    raise SystemExit(f"{name}: {row['pairs_from_cache']} of {args.pairs} pairs from the cache")
                results.append(row)
                common.log(f"extra {extra} {name}: {row['wall_s']:.1f} s, peak MiB {row['peak_mib']}")

    print(f"\n{'code':<9} {'cached':>9} {'wall s':>7} {'driver':>7} {'worker':>7} {'private':>7} {'lookup s':>8}")
    for r in results:
        m = r["peak_mib"]
        print(f"{r['code']:<9} {r['cached']:>9} {r['wall_s']:>7.1f} {m['driver']:>7} {m['worker']:>7} "
              f"{m['worker_private']:>7} {r['lookup_s']:>8.2f}")
    if not args.no_write:
        settings = {k: str(v) for k, v in vars(args).items()}
        path = common.write_result("reference_cache", {"machine": common.machine_info(), "args": settings,
                                                       "results": results})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
