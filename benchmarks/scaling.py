"""Figure 4: wall time and peak memory of the sample, reference and train stages at 1x, 4x and 16x the data.

Each stage runs alone from the CLI (`python -m dpo_ray.cli <stage>`, its own local Ray cluster), exactly as a user
would run it, while this script polls the resident memory (RSS) of every process in that command's tree:
  - driver: the CLI process itself (where a stage that collected a dataset would show growth);
  - worker: the largest single Ray worker process (`ray::...`: the sampler and scorer actors, Ray Data tasks,
    Ray Train workers);
  - ray infrastructure (raylet, GCS, dashboard) is reported apart.
Sizes: sample `--base-prompts` x scale prompts (n completions each); reference and train `--base-pairs` x scale
synthetic pairs (common.build_pairs: real prompts, 40-token windows of review text), train for one epoch.
Time should grow linearly with the data (after a fixed start-up cost, which the per-unit slope separates) and the
driver's and each worker's peak memory should stay flat, since every stage streams its data.

    .venv-bench/bin/python benchmarks/scaling.py                # SmolLM2, scales 1,4,16
    BENCH_MODEL=builtin:tiny-llama .venv-bench/bin/python benchmarks/scaling.py --scales 1,4   # smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

import common

_INFRA = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server")


class TreeMemory:
    """Peak RSS of a process tree, polled every `interval` seconds in a thread: driver, largest worker, infra.
    `worker_private`: the largest peak, over workers, of RSS minus shared pages (file-backed and shared-memory
    pages, which include the Ray object store blocks a worker maps): the memory a worker alone holds.
    `worker_hwm`: the largest, over workers, of the kernel's own peak RSS (VmHWM in /proc/<pid>/status), which
    catches a transient peak between two polls; the polled peaks only see the moments they sample."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = {"driver": 0, "worker": 0, "worker_private": 0, "worker_hwm": 0, "worker_name": "",
                     "infra": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    info, cmd = proc.memory_info(), " ".join(proc.cmdline())
                    rss = info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if proc.pid == self.root.pid:
                    self.peak["driver"] = max(self.peak["driver"], rss)
                elif cmd.startswith("ray::"):
                    if rss > self.peak["worker"]:
                        self.peak["worker"], self.peak["worker_name"] = rss, cmd.split()[0]
                    self.peak["worker_private"] = max(self.peak["worker_private"], rss - info.shared)
                    self.peak["worker_hwm"] = max(self.peak["worker_hwm"], _high_water_mark(proc.pid))
                elif any(name in cmd for name in _INFRA):
                    self.peak["infra"] = max(self.peak["infra"], rss)
            self._stop.wait(self.interval)


def _high_water_mark(pid: int) -> int:
    """The kernel's peak resident set size of a process, in bytes (0 where /proc has none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_stage(stage: str, args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "dpo_ray.cli", stage, "--config", str(common.ROOT / "configs" / "default.yaml"), *args]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(proc.pid) as memory:
        output, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{output[-3000:]}")
    mib = {k: (round(v / 2**20) if k != "worker_name" else v) for k, v in memory.peak.items()}
    return {"wall_s": wall, "peak_mib": mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,4,16")
    p.add_argument("--stages", default="sample,reference,train")
    p.add_argument("--base-prompts", type=int, default=4)
    p.add_argument("--base-pairs", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    # Batches no larger than the smallest scale's data, so every scale runs several of them: a stage that streams
    # then holds the same amount at every scale, and growth in peak memory would mean something collects the data.
    p.add_argument("--sample-batch-size", type=int, default=4, help="prompts per generate call")
    p.add_argument("--reference-batch-size", type=int, default=2, help="pairs per forward (x4 rows per Ray batch)")
    p.add_argument("--train-batch-size", type=int, default=2, help="pairs per optimizer step (and per micro-batch)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    stages = args.stages.split(",")

    from dpo_ray import schemas

    tokenizer, _ = common.load_tokenizer_and_path()
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    # reference.cache=false: the pair sets are nested (the first 8 of 32 are the 8), so a cache would score less.
    common_overrides = [f"model.policy={common.MODEL}", f"run.torch_threads={args.threads}", "reference.cache=false",
                        "run.tracking_uri=sqlite:///{}".format("{root}/mlflow.db")]
    results: dict[str, list[dict]] = {s: [] for s in stages}
    with tempfile.TemporaryDirectory(prefix="dpo-scaling-") as tmp:
        root = Path(tmp)
        overrides = [o.format(root=root) for o in common_overrides] + [f"run.root={root}"]
        for scale in scales:
            out = root / f"x{scale}"
            n_pairs = args.base_pairs * scale
            pairs_dir = out / "pairs"
            pairs_dir.mkdir(parents=True)
            pq.write_table(schemas.rows_to_table(common.build_pairs(tokenizer, n_pairs), schemas.PAIRS),
                           pairs_dir / "part-0.parquet")
            plan = {
                "sample": (["--out", str(out / "sample"), f"data.num_train_prompts={args.base_prompts * scale}",
                            "data.num_eval_prompts=0", f"sample.max_new_tokens={args.max_new_tokens}",
                            f"sample.batch_size={args.sample_batch_size}"],
                           {"prompts": args.base_prompts * scale}),
                "reference": (["--pairs", str(pairs_dir), "--out", str(out / "reference"),
                               f"reference.batch_size={args.reference_batch_size}"], {"pairs": n_pairs}),
                "train": (["--reference", str(out / "reference"), "--out", str(out / "train"), "train.epochs=1",
                           "train.warmup_steps=0", f"train.checkpoint_every={10**6}",
                           f"train.batch_size={args.train_batch_size}",
                           f"train.micro_batch_size={args.train_batch_size}"], {"pairs": n_pairs}),
            }
            for stage in stages:
                stage_args, size = plan[stage]
                common.log(f"x{scale} {stage} {size} ...")
                row = {"scale": scale, **size, **run_stage(stage, stage_args + overrides, env)}
                results[stage].append(row)
                common.log(f"x{scale} {stage}: {row['wall_s']:.1f}s, peak MiB {row['peak_mib']}")

    summary = {}
    print(f"\n{'stage':<10} {'scale':>5} {'size':>6} {'wall s':>8} {'s/unit':>7} {'driver':>7} {'worker':>7} {'private':>7} {'hwm':>7}  worker process")
    for stage, rows in results.items():
        for r in rows:
            size = r.get("prompts", r.get("pairs"))
            print(f"{stage:<10} {r['scale']:>5} {size:>6} {r['wall_s']:>8.1f} {r['wall_s'] / size:>7.2f} "
                  f"{r['peak_mib']['driver']:>7} {r['peak_mib']['worker']:>7} "
                  f"{r['peak_mib']['worker_private']:>7} {r['peak_mib']['worker_hwm']:>7}  {r['peak_mib']['worker_name']}")
        first, last = rows[0], rows[-1]
        size_of = lambda r: r.get("prompts", r.get("pairs"))  # noqa: E731
        if len(rows) > 1:
            # Marginal seconds per unit between the smallest and largest run: the start-up cost cancels.
            slope = (last["wall_s"] - first["wall_s"]) / (size_of(last) - size_of(first))
            summary[stage] = {
                "marginal_s_per_unit": slope, "fixed_s": first["wall_s"] - slope * size_of(first),
                "driver_peak_growth": last["peak_mib"]["driver"] / max(first["peak_mib"]["driver"], 1),
                "worker_peak_growth": last["peak_mib"]["worker"] / max(first["peak_mib"]["worker"], 1),
                "worker_private_growth": last["peak_mib"]["worker_private"] / max(first["peak_mib"]["worker_private"], 1),
                "worker_hwm_growth": last["peak_mib"]["worker_hwm"] / max(first["peak_mib"]["worker_hwm"], 1),
            }
            if len(rows) > 2:
                mid = rows[len(rows) // 2]
                predicted = summary[stage]["fixed_s"] + slope * size_of(mid)
                summary[stage]["middle_vs_linear"] = mid["wall_s"] / predicted
            print(f"  {stage}: {slope:.2f} s per unit + {summary[stage]['fixed_s']:.0f} s fixed; peak memory x"
                  f"{size_of(last) // size_of(first)} data: driver x{summary[stage]['driver_peak_growth']:.2f}, "
                  f"worker x{summary[stage]['worker_peak_growth']:.2f} (private x{summary[stage]['worker_private_growth']:.2f}, kernel peak "
                  f"x{summary[stage]['worker_hwm_growth']:.2f})")
    if not args.no_write:
        path = common.write_result("scaling", {"machine": common.machine_info(), "model": common.MODEL,
                                               "args": vars(args), "results": results, "summary": summary})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
