"""Figure 9: how long a fresh local Ray cluster takes to run its first tasks and start actors, as `init_ray` starts
it (no runtime env) against the same cluster with the driver's env vars as a runtime env (what `init_ray` passed
before 2026-12-07 and still passes where it joins a running cluster).

Under any runtime env Ray runs no task or actor in the worker processes it prestarted at `ray.init`; each waits for
a process started for that env. Each side runs in its own fresh process (one cluster each), alternately:

    .venv/bin/python benchmarks/worker_start.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common

TASKS = 20
ACTORS = 3


def one_cluster(side: str) -> dict:
    """Seconds to start the cluster, to finish TASKS trivial tasks and to start each of ACTORS actors, one by one."""
    import ray

    from dpo_ray.cluster import forwarded_env, init_ray
    from dpo_ray.config import load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    if side == "init_ray":
        init_ray(load_config("configs/tiny.yaml", ["run.ray_address=local"]))
    else:
        ray.init(address="local", runtime_env={"env_vars": forwarded_env(os.environ)})
    out = {"ray_init_s": time.perf_counter() - started, "runtime_env": ray.get_runtime_context().runtime_env}

    @ray.remote
    def task(i: int) -> int:
        return i

    @ray.remote
    class Actor:
        def ping(self) -> int:
            return os.getpid()

    started = time.perf_counter()
    assert ray.get([task.remote(i) for i in range(TASKS)]) == list(range(TASKS))
    out["tasks_s"] = time.perf_counter() - started
    out["actor_s"] = []
    for _ in range(ACTORS):
        started = time.perf_counter()
        actor = Actor.remote()
        ray.get(actor.ping.remote())
        out["actor_s"].append(time.perf_counter() - started)
        ray.kill(actor)
    ray.shutdown()
    return out


def run_side(side: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, __file__, "--child", side], cwd=common.ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{side}: the child failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=["init_ray", "runtime_env"], help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print only, write no result file")
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_cluster(args.child)))
        return

    sides = {"init_ray": lambda _: run_side("init_ray"), "runtime_env": lambda _: run_side("runtime_env")}
    _, _, outputs = common.alternate(sides, args.rounds)
    summary = {}
    for side, runs in outputs.items():
        summary[side] = {"tasks_s_median": statistics.median(r["tasks_s"] for r in runs),
                         "actor_s_median": statistics.median(s for r in runs for s in r["actor_s"]),
                         "ray_init_s_median": statistics.median(r["ray_init_s"] for r in runs)}
    ratios = {k.replace("_median", "_ratio"): summary["runtime_env"][k] / summary["init_ray"][k]
              for k in summary["init_ray"]}
    for side, s in summary.items():
        print(f"{side:<12} {TASKS} tasks {s['tasks_s_median']:.2f} s, an actor {s['actor_s_median']:.2f} s, "
              f"ray.init {s['ray_init_s_median']:.2f} s (medians of {args.rounds} clusters)")
    print("runtime env / init_ray: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if not args.no_write:
        path = common.write_result("worker_start", {
            "machine": common.machine_info(), "code": common.code_version(), "load_average": common.load_average(),
            "tasks": TASKS, "actors": ACTORS, "runs": outputs, "summary": summary, "ratios": ratios})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
