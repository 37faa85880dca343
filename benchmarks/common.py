"""Shared helpers of the benchmark scripts: machine facts, the fp32 matmul peak, a deterministic preference
workload built from the real tokenizer, step timing and JSON results under benchmarks/results/.

Every script runs both sides of a comparison in one process, alternately (A, B, A, B, ...), on the same model,
pairs, batch shape and dtype (fp32), so a load spike on a shared machine hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ROOT / "data" / "prompts" / "movie_reviews.jsonl"
MODEL = os.environ.get("BENCH_MODEL", "builtin:smollm2-135m-instruct")  # builtin:tiny-llama for smoke runs

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Real English text for the completions: short movie-review sentences, the kind of text the default run samples.
# Completions are windows of its tokens, so their token statistics are those of text, not of uniform random ids.
_REVIEW_TEXT = (
    "The film opens on a quiet harbor at dawn and never quite recovers its nerve after that first shot. "
    "The lead gives a warm, unforced performance, and the supporting cast makes the most of thin material. "
    "I loved the score, which swells at exactly the right moments without ever telling you what to feel. "
    "Sadly the second act drags, with a subplot about a missing letter that goes nowhere and takes forever. "
    "The cinematography is gorgeous: long takes of wheat fields, rain on tin roofs, faces lit by candles. "
    "It is a clumsy, overlong movie that mistakes noise for tension and cruelty for depth. "
    "Still, the final twenty minutes are genuinely moving, and the last line landed with real force. "
    "The dialogue feels stiff, as if every character had memorized a pamphlet about their own feelings. "
    "Families will enjoy the jokes, the chase through the market, and the unexpectedly tender ending. "
    "The director clearly admires the old westerns, but admiration is not the same thing as understanding. "
    "A delightful surprise: smart, funny, and kind, with a villain you almost root for by the end. "
    "The special effects look cheap, the pacing is erratic, and the plot twists can be seen from miles away. "
    "Few recent dramas have captured grief this honestly, without speeches or easy consolation. "
    "By the time the credits rolled I had checked my watch four times and forgotten most of the names. "
)


def set_threads(threads: int = 2) -> int:
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    """CPU model, cores, SIMD flags, versions and the load average: the context every result is read in."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import transformers

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": sorted(f for f in flags if f.startswith(("avx", "amx")) or f == "fma"),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": load_average(),
        "code_at_start": _CODE_AT_START,
    }


def code_version() -> dict:
    """The commit and the state of dpo_ray/ the numbers were measured on (read-only git calls)."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    digest = hashlib.sha256()
    for f in sorted((ROOT / "dpo_ray").rglob("*.py")):
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", "dpo_ray").splitlines(),
            "dpo_ray_sha256": digest.hexdigest()[:16]}


# Taken when a script starts, i.e. when it imports dpo_ray: the code it measured (dpo_ray may change mid-run).
_CODE_AT_START = code_version()


def call_times(call, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of `call()`, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, threads: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """Best GFLOP/s of torch.matmul on (n, n) x (n, n) in `dtype` with `threads` threads (2*n^3 FLOP per matmul)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        times = call_times(lambda: torch.matmul(a, b, out=out), warmup=2, repeats=repeats)
    finally:
        torch.set_num_threads(previous)
    flop = 2 * n**3
    return {"n": n, "threads": threads, "repeats": repeats, "best_gflops": flop / min(times) / 1e9,
            "median_gflops": flop / statistics.median(times) / 1e9}


# --- workload ------------------------------------------------------------------------------------------------

def load_tokenizer_and_path():
    from dpo_ray.models import load_tokenizer, resolve_model

    path = resolve_model(MODEL)
    return load_tokenizer(path), path


def load_model(path: str, train: bool = False):
    from dpo_ray.models import load_causal_lm

    model = load_causal_lm(path, "float32")
    model.config.use_cache = False
    return model.train() if train else model.eval()


def read_prompts(n: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def prompt_ids(tokenizer, prompts: list[dict], max_prompt_tokens: int = 96) -> list[list[int]]:
    """Prompts rendered with the chat template, exactly as the sample stage tokenizes them."""
    from dpo_ray.text import prompt_token_ids

    return [prompt_token_ids(tokenizer, r["prompt"], None, None, max_prompt_tokens, "keep_end")[0] for r in prompts]


def build_pairs(tokenizer, n_pairs: int, completion_tokens: int = 40, seed: int = 0,
                max_prompt_tokens: int = 96) -> list[dict]:
    """n_pairs deterministic preference pairs as PAIRS-schema rows.

    Prompts: the project's movie-review prompts, chat-templated. Chosen / rejected: two different windows of
    `completion_tokens` tokens of real review text, the last token replaced by EOS (as a finished sample ends),
    so every completion has exactly `completion_tokens` tokens and both sides of a comparison see equal work.
    """
    text_ids = tokenizer(_REVIEW_TEXT * 4, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    prompts = read_prompts(n_pairs, seed)
    ids = prompt_ids(tokenizer, prompts, max_prompt_tokens)
    rows = []
    for i, (p, pid) in enumerate(zip(prompts, ids)):
        windows = []
        for _ in range(2):
            start = rng.randrange(0, len(text_ids) - completion_tokens)
            windows.append(text_ids[start : start + completion_tokens - 1] + [eos])
        chosen, rejected = windows
        rows.append({
            "pair_id": f"bench-{i:05d}", "prompt_id": p["id"], "prompt": p["prompt"], "prompt_ids": pid,
            "chosen": tokenizer.decode(chosen, skip_special_tokens=True), "chosen_ids": chosen,
            "rejected": tokenizer.decode(rejected, skip_special_tokens=True), "rejected_ids": rejected,
            "chosen_reward": 1.0, "rejected_reward": 0.0,
        })
    return rows


def pair_tokens(rows: list[dict]) -> int:
    """Non-padding tokens a pair-batched forward processes: (prompt + chosen) + (prompt + rejected) per pair."""
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


def describe_pairs(rows: list[dict]) -> dict:
    plen = [len(r["prompt_ids"]) for r in rows]
    clen = [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]
    return {"pairs": len(rows), "prompt_tokens_min": min(plen), "prompt_tokens_mean": statistics.mean(plen),
            "prompt_tokens_max": max(plen), "completion_tokens": sorted(set(clen))}


def n_params(model) -> int:
    # Tied input/output embeddings are one tensor; count each parameter once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def forward_flop(model, decoder_tokens: int, head_rows: int) -> tuple[int, int]:
    """FLOP of a forward as (decoder body, LM head): 2 x the non-embedding parameters per token through the decoder
    (padding included), 2 x hidden x vocab per row through the output layer."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    return 2 * (n_params(model) - vocab * hidden) * decoder_tokens, 2 * hidden * vocab * head_rows


# --- timing --------------------------------------------------------------------------------------------------

class Clock:
    """Wall and process-CPU seconds of a block. On a shared machine, cpu/wall well under the thread count means the
    block waited for a core; the CPU seconds then say more about the work than the wall seconds."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        return False


def summarize(times: list[float], warmup: int, cpu: list[float] | None = None) -> dict:
    """Median, min and max of the steps after the first `warmup` (all of them if none are left); seconds."""
    kept = times[warmup:] or times
    out = {"all_s": [round(t, 4) for t in times], "warmup": len(times) - len(kept),
           "median_s": statistics.median(kept), "min_s": min(kept), "max_s": max(kept), "timed_steps": len(kept)}
    if cpu:
        kept_cpu = cpu[warmup:] or cpu
        out.update({"cpu_all_s": [round(t, 4) for t in cpu], "cpu_median_s": statistics.median(kept_cpu)})
    return out


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>-<UTC timestamp>.json; returns its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    payload = {"benchmark": name, "utc": stamp, "command": " ".join([Path(sys.executable).name] + sys.argv),
               **payload}
    text = json.dumps(payload, indent=2, default=float)
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(text + "\n")
    return path


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def alternate(sides: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Run each side's fn(round) once per round, sides interleaved (A, B, A, B, ...) so drift hits both alike.

    Returns wall seconds, CPU seconds and fn outputs, each {side: [per round]}.
    """
    times = {s: [] for s in sides}
    cpu = {s: [] for s in sides}
    outputs = {s: [] for s in sides}
    for i in range(rounds):
        for side, fn in sides.items():
            with Clock() as clock:
                out = fn(i)
            times[side].append(clock.wall)
            cpu[side].append(clock.cpu)
            outputs[side].append(out)
            log(f"round {i} {side}: {clock.wall:.2f}s wall, {clock.cpu:.2f}s cpu, {out}; load {load_average()}")
    return times, cpu, outputs


def trl_step(trainer, model, inputs: dict) -> torch.Tensor:
    """One optimizer step of TRL's Trainer on collated `inputs`: its training_step, then what
    Trainer._inner_training_loop does at an accumulation boundary. Returns the loss."""
    loss = trainer.training_step(model, inputs)
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return loss
