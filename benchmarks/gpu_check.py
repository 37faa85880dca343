"""The compute cores on a GPU, without Ray: the check to run on the GPU machine we can borrow.

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU machine (a few minutes)
    python benchmarks/gpu_check.py --device cpu --layers 2 --small  # what tests/test_gpu_check.py runs
    python benchmarks/gpu_check.py --only-throughput --out f6.json  # figure 6 alone (1B train step, three sides)

That machine has torch and transformers but cannot hold Ray, vLLM or model weights (../shared/FIELD_NOTES.md), so
this imports only the Ray-free cores (dpo_ray.sampling, dpo_ray.logprobs, dpo_ray.losses; DeepSpeed and TRL where
they are installed, there from wheels carried in .whl/) and builds a model with SmolLM2-135M-Instruct's
architecture and random weights. In bf16 on the device, against the same work in fp32 on the CPU:

1. scorer: `shared_prompt_logps` on chosen/rejected pairs; per-sequence log-prob sums within bf16 tolerance;
2. sampler: `sample_tokens` runs on the device; its summed log-probs agree with the scorer's rescoring of the
   sampled tokens on the device;
3. train step: `SequenceScorer` + `dpo_objective` + AdamW, as a training worker runs it; loss and gradient norm of
   the first step match the CPU step, and a few steps lower the loss;
4. deepspeed_zero2 / deepspeed_zero3: the train stage's GPU engine (`dpo_ray.engines.DeepSpeedEngine`, bf16, a
   one-rank NCCL process group): the first loss matches the CPU fp32 step, the loss falls, and the policy it saves
   reloads with transformers and scores the batch as the engine does; skipped with --no-deepspeed;
5. throughput (not pass/fail): train steps of a Llama-3.2-1B-shaped model (with --small, SmolLM2's layers and a
   4,096-token vocabulary, as in every check with --small), ours (prompt shared by both completions, log-softmax of
   the picked tokens only) against a plain PyTorch step as TRL-style trainers take it (prompt+chosen and
   prompt+rejected as 2B sequences, full logits) and against TRL's DPOTrainer itself (precompute_ref_log_probs=True,
   driven as figure 1 drives it: gpu_trl.py), interleaved; pair tokens/s, the ratios, and MFU against the bf16
   matmul rate measured in the same process. The TRL side is reported as skipped, with the reason, where `trl`
   cannot be imported (or with --no-trl); the rest runs alike;

and writes a JSON with the device, versions, each check's numbers and throughput. Exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  benchmarks/common.py: torch and the standard library only
import gpu_trl  # noqa: E402  imports TRL only when its side runs
from dpo_ray.logprobs import SequenceScorer, pad_batch, shared_prompt_batch, shared_prompt_logps  # noqa: E402
from dpo_ray.losses import dpo_objective  # noqa: E402
from dpo_ray.sampling import sample_seed, sample_tokens  # noqa: E402

# SmolLM2-135M-Instruct's config.json (the embedded default's architecture); tests/test_gpu_check.py checks it
# against the converted model in the cache.
SMOLLM2_135M = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
# Llama-3.2-1B's shape (1.24B parameters), for a throughput that keeps an H100/H200 busy.
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
PAD, EOS = 2, 2
# --small keeps SmolLM2's layers but not its 49,152-token vocabulary: on a CPU without bf16 units the output layer
# of the bf16 checks took 4.6 s a step at that size, and the smoke run 3 minutes.
SMALL_VOCAB = 4096
# Summed log-probs of bf16 against fp32: bf16 keeps 8 bits of mantissa, so each token's log-prob is off by up to
# ~0.4% and a sequence's sum by about that fraction (measured on CPU: 0.1-0.3%); 2% leaves room for GPU kernels.
LOGP_RTOL = 0.02
GRAD_RTOL = 0.1


def build_model(layers: int, dtype: torch.dtype, device: str, seed: int = 0, shape: dict = SMOLLM2_135M
                ) -> torch.nn.Module:
    config = transformers.LlamaConfig(**{**shape, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    return model.to(dtype=dtype, device=device)


def random_pairs(count: int, prompt_len: int, completion_len: int, seed: int, vocab_size: int) -> tuple[list, list]:
    """Token ids of `count` prompts and their two completions, lengths varying a little as real pairs do."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(prompt_len - i % 4) for i in range(count)]
    completions = [[ids(max(1, completion_len - i % 5)), ids(max(1, completion_len - i % 3))] for i in range(count)]
    return prompts, completions


def on_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double().cpu() - b.double().cpu()).abs() / b.double().cpu().abs().clamp(min=1e-6)).max())


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def check_scorer(args, reference_cpu, model) -> dict:
    prompts, completions = random_pairs(args.pairs, args.prompt_len, args.completion_len, seed=1,
                                        vocab_size=args.shape["vocab_size"])
    batch = shared_prompt_batch(prompts, completions, PAD)
    with torch.inference_mode():
        expected, _ = shared_prompt_logps(reference_cpu, **batch)
        shared_prompt_logps(model, **on_device(batch, args.device))  # warm-up (kernels, allocator)
        (got, counts), seconds = timed(lambda: shared_prompt_logps(model, **on_device(batch, args.device)),
                                       args.device)
    error = relative_error(got, expected)
    return {"ok": got.device.type == args.device and error <= LOGP_RTOL, "ran_on": got.device.type,
            "max_relative_error": error, "tolerance": LOGP_RTOL, "sequences": len(got),
            "tokens_per_s": float(counts.sum()) / seconds}


def check_sampler(args, model) -> dict:
    prompts, _ = random_pairs(args.prompts, args.prompt_len, 1, seed=2, vocab_size=args.shape["vocab_size"])
    seeds = [sample_seed(0, str(i), j) for i in range(len(prompts)) for j in range(args.n)]
    run = lambda: sample_tokens(model, prompts, seeds, args.n, args.new_tokens, 1.0, 1.0, {EOS}, PAD)  # noqa: E731
    run()  # warm-up
    samples, seconds = timed(run, args.device)
    # The sampler's own log-prob of each sampled sequence against a rescoring by the scorer, on the device.
    groups = [[s[0] for s in samples[i * args.n:(i + 1) * args.n]] for i in range(len(prompts))]
    batch = on_device(shared_prompt_batch(prompts, groups, PAD), args.device)
    with torch.inference_mode():
        rescored, counts = shared_prompt_logps(model, **batch)
    error = relative_error(torch.tensor([s[1] for s in samples]), rescored)
    return {"ok": rescored.device.type == args.device and error <= LOGP_RTOL, "ran_on": rescored.device.type,
            "max_relative_error_vs_rescoring": error, "tolerance": LOGP_RTOL, "sequences": len(samples),
            "new_tokens_per_s": float(counts.sum()) / seconds}


def train_steps(model, batch: dict, reference: tuple, steps: int, lr: float) -> tuple[list[float], float, float]:
    """DPO steps as a training worker takes them; (losses, first step's grad norm, seconds per later step)."""
    scorer = SequenceScorer(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, first_norm, seconds = [], None, []
    device = next(model.parameters()).device.type
    for _ in range(steps):
        def step():
            logps, counts = scorer(**batch)
            out = dpo_objective(logps[0::2], logps[1::2], reference[0], reference[1], counts[0::2], counts[1::2], beta=0.1)
            out.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.item(), norm.item()
        (loss, norm), took = timed(step, device)
        losses.append(loss)
        first_norm = norm if first_norm is None else first_norm
        seconds.append(took)
    return losses, first_norm, sum(seconds[1:]) / max(1, len(seconds) - 1)


def train_batch(args) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """The training pairs (on the CPU) and reference log-probs offset from the initial policy's, so the first loss
    is not exactly log 2."""
    prompts, completions = random_pairs(args.train_pairs, args.prompt_len, args.completion_len, seed=3,
                                        vocab_size=args.shape["vocab_size"])
    batch = shared_prompt_batch(prompts, completions, PAD)
    with torch.inference_mode():
        initial, _ = shared_prompt_logps(build_model(args.layers, torch.float32, "cpu", shape=args.shape), **batch)
    offsets = torch.linspace(-2.0, 2.0, len(prompts))
    return batch, (initial[0::2] + offsets, initial[1::2] - offsets)


def check_train_step(args, dtype) -> dict:
    batch, reference = train_batch(args)
    cpu_model = build_model(args.layers, torch.float32, "cpu", shape=args.shape)
    cpu_losses, cpu_norm, _ = train_steps(cpu_model, batch, reference, 1, args.lr)
    model = build_model(args.layers, dtype, args.device, shape=args.shape)
    losses, norm, step_seconds = train_steps(model, on_device(batch, args.device),
                                             tuple(r.to(args.device) for r in reference), args.steps, args.lr)
    loss_error = abs(losses[0] - cpu_losses[0]) / abs(cpu_losses[0])
    norm_error = abs(norm - cpu_norm) / cpu_norm
    ran_on = next(model.parameters()).device.type
    return {"ok": ran_on == args.device and loss_error <= LOGP_RTOL and norm_error <= GRAD_RTOL
            and losses[-1] < losses[0], "ran_on": ran_on, "losses": losses, "cpu_fp32_first_loss": cpu_losses[0],
            "first_loss_relative_error": loss_error, "grad_norm": norm, "cpu_fp32_grad_norm": cpu_norm,
            "grad_norm_relative_error": norm_error, "tolerances": [LOGP_RTOL, GRAD_RTOL],
            "pairs_per_step": len(reference[0]), "seconds_per_step": step_seconds}


def _one_rank_process_group(device: str) -> str:
    """torch.distributed with one rank, as Ray Train starts it per worker (NCCL on GPU, gloo on CPU)."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group(backend, rank=0, world_size=1)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)  # the collective the engines' gradient reduction rests on
    return dist.get_backend()


class _NoTokenizer:
    """The check has no tokenizer files (they cannot travel); the engine's save writes the model alone."""

    def save_pretrained(self, path) -> None:
        pass


def check_deepspeed(args, stage: int, cpu_first_loss: float) -> dict:
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dpo_ray.config import TrainConfig
    from dpo_ray.engines import POLICY_DIR, DeepSpeedEngine

    backend = _one_rank_process_group(args.device)
    batch, reference = train_batch(args)
    batch, reference = on_device(batch, args.device), tuple(r.to(args.device) for r in reference)
    pairs = len(reference[0])
    t = TrainConfig(strategy="deepspeed", zero_stage=stage, lr=args.lr, batch_size=pairs, micro_batch_size=pairs,
                    num_workers=1, max_grad_norm=None, use_gpu=args.device == "cuda")
    model = build_model(args.layers, torch.float32, args.device, shape=args.shape)
    engine = DeepSpeedEngine(SequenceScorer(model), t, args.dtype, pairs, 1)
    engine.model.train()
    losses, norms = [], []
    for _ in range(args.steps):
        logps, counts = engine.model(**batch)
        out = dpo_objective(logps[0::2], logps[1::2], reference[0], reference[1], counts[0::2], counts[1::2], beta=0.1)
        engine.backward(out.loss)
        norm, _ = engine.step()
        losses.append(out.loss.item())
        norms.append(norm)
    engine.model.eval()
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        trained, _ = engine.model(**batch)
        engine.save(Path(tmp), 0, _NoTokenizer())
        saved = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / POLICY_DIR, dtype=getattr(
            torch, args.dtype)).to(args.device)
        reloaded, _ = shared_prompt_logps(saved, **batch)
    loss_error = abs(losses[0] - cpu_first_loss) / abs(cpu_first_loss)
    reload_error = relative_error(reloaded, trained)
    ran_on = next(engine.raw.parameters()).device.type
    return {"ok": ran_on == args.device and loss_error <= LOGP_RTOL and losses[-1] < losses[0]
            and reload_error <= 1e-3, "ran_on": ran_on, "backend": backend, "zero_stage": stage,
            "param_dtype": str(next(engine.raw.parameters()).dtype), "losses": losses, "grad_norms": norms,
            "cpu_fp32_first_loss": cpu_first_loss, "first_loss_relative_error": loss_error,
            "saved_policy_reload_max_relative_error": reload_error}


def plain_pair_logps(model, prompts: list, completions: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's scoring: prompt+completion as one sequence per completion, full logits, log-softmax of all."""
    flat = [c for group in completions for c in group]
    batch = pad_batch([p for p in prompts for _ in completions[0]], flat, PAD)
    batch = on_device(batch, next(model.parameters()).device.type)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"][:, 1:]
    return (logps * mask).sum(-1), mask.sum(-1)


def matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    """The n x n matmul rate, over as many products (at most 10) as take about a second: on a CPU without bf16
    units one bf16 product of 1024 x 1024 takes about 2 s, and 3 warm-ups and 10 timed ones were half of the test."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # not timed: the first product also loads the kernels (cuBLAS's on a GPU)
    _, one = timed(lambda: a @ b, device)
    repeats = min(10, int(1.0 / max(one, 1e-9)))
    if repeats <= 1:
        return 2 * n**3 / one / 1e12
    _, seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n**3 * repeats / seconds / 1e12


def check_throughput(args, dtype) -> dict:
    shape = args.shape if args.small else LLAMA_1B
    layers = args.layers if args.small else shape["num_hidden_layers"]
    prompts, completions = random_pairs(args.tp_pairs, args.tp_prompt_len, args.tp_completion_len, seed=4,
                                        vocab_size=shape["vocab_size"])
    # Every completion ends with EOS, as a finished sample does (and as TRL's tokenization of text makes it).
    completions = [[c[:-1] + [EOS] for c in group] for group in completions]
    batch = on_device(shared_prompt_batch(prompts, completions, PAD), args.device)
    pair_tokens = sum(2 * len(p) + len(c) + len(r) for p, (c, r) in zip(prompts, completions))
    rounds = args.tp_warmup + args.tp_steps

    def side(score):
        model = build_model(layers, dtype, args.device, shape=shape).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

        def step():
            logps, counts = score(model)
            out = dpo_objective(logps[0::2], logps[1::2], reference[0], reference[1], counts[0::2], counts[1::2], beta=0.1)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach(), pair_tokens
        return model, step

    ours_model, ours = side(lambda m: shared_prompt_logps(m, **batch))
    # Reference log-probs: the initial policy's (every side starts from the same weights), so each side's first
    # loss is log 2 and the sides' losses can be compared step by step. Not timed, as TRL's precompute is not.
    with torch.inference_mode():
        initial, _ = shared_prompt_logps(ours_model, **batch)
    reference = (initial[0::2].clone(), initial[1::2].clone())
    peer_model, peer = side(lambda m: plain_pair_logps(m, prompts, completions))
    parameters = sum(p.numel() for p in ours_model.parameters())
    steps = {"ours": ours, "plain_pytorch": peer}
    trl_result, trl_tmp = _trl_side(args, dtype, layers, shape, prompts, completions, rounds, initial)
    if "step" in trl_result:
        steps["trl_precompute"] = trl_result.pop("step")
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for round_ in range(rounds):
        for name, step in list(steps.items()):
            try:
                (loss, tokens, *shape_), seconds = timed(step, args.device)
            except Exception as e:  # the TRL side only: ours and the plain step must not fail
                if name != "trl_precompute":
                    raise
                trl_result.update(error=f"step {round_}: {type(e).__name__}: {e}".splitlines()[0],
                                  traceback=traceback.format_exc()[-3000:])
                del steps[name], times[name], losses[name]
                continue
            losses[name].append(float(loss))
            if name == "trl_precompute":  # its collator's non-padding tokens: the same pairs as ours
                trl_result.update(tokens_per_step=tokens, same_tokens_as_ours=tokens == pair_tokens,
                                  batch_shape=shape_[0])
            if round_ >= args.tp_warmup:
                times[name].append(seconds)
    if trl_tmp is not None:
        trl_tmp.cleanup()
    peak = matmul_tflops(args.device, dtype, 8192 if args.device == "cuda" else 1024)
    name = f"SmolLM2-135M, vocabulary {SMALL_VOCAB}" if args.small else "Llama-3.2-1B"
    result = {"shape": name, "layers": layers, "parameters": parameters,
              "pairs_per_step": len(prompts), "pair_tokens_per_step": pair_tokens,
              "matmul_tflops": peak, "warmup_rounds": args.tp_warmup, "steps_timed": args.tp_steps,
              "order": list(steps)}
    for name, seconds in times.items():
        stats = common.summarize(seconds, 0)
        per_step = stats["median_s"]
        result[name] = {"seconds_per_step": per_step, "pair_tokens_per_s": pair_tokens / per_step,
                        "mfu": 6 * parameters * pair_tokens / per_step / (peak * 1e12),
                        "min_s": stats["min_s"], "max_s": stats["max_s"], "timed_s": stats["all_s"],
                        "losses": losses[name]}
    result["trl_precompute"] = {**trl_result, **result.get("trl_precompute", {})}
    result["ours_over_plain_pytorch"] = (result["ours"]["pair_tokens_per_s"]
                                         / result["plain_pytorch"]["pair_tokens_per_s"])
    if "pair_tokens_per_s" in result["trl_precompute"]:
        result["ours_over_trl_precompute"] = (result["ours"]["pair_tokens_per_s"]
                                              / result["trl_precompute"]["pair_tokens_per_s"])
    if args.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del ours_model, peer_model
    # A TRL side that imports but then fails is a finding, not a skip: the check says so (the rest is kept).
    return {"ok": "error" not in trl_result, "ran_on": args.device, **result}


def _trl_side(args, dtype, layers, shape, prompts, completions, rounds, ours_reference) -> tuple[dict, object]:
    """Figure 6's third side: TRL's DPOTrainer (gpu_trl.py) on its own copy of the model; ({"step": fn, ...} or
    {"skipped": True, "reason": ...} or {"error": ...}, the temp folder to remove after the steps or None)."""
    if args.no_trl:
        return {"skipped": True, "reason": "--no-trl"}, None
    reason = gpu_trl.unavailable()
    found = {"versions": gpu_trl.versions(), "requirements_unmet": gpu_trl.unmet_requirements()}
    if reason is not None:
        return {"skipped": True, "reason": f"trl cannot be imported: {reason}", **found}, None
    out = {"skipped": False, **found}
    tmp = tempfile.TemporaryDirectory()
    try:
        model = build_model(layers, dtype, args.device, shape=shape).train()
        step, info = gpu_trl.trl_side(model, prompts, completions, 0.1, 1e-6, args.device, rounds, tmp.name)
    except Exception as e:
        tmp.cleanup()
        return {**out, "error": f"setup: {type(e).__name__}: {e}".splitlines()[0],
                "traceback": traceback.format_exc()[-3000:]}, None
    theirs = torch.tensor([x for pair in zip(info.pop("ref_chosen_logps"), info.pop("ref_rejected_logps"))
                           for x in pair])
    # TRL's precomputed reference log-probs against our scorer's on the same initial weights: the same tokens
    # scored by two implementations (bf16), so equal within bf16 tolerance.
    out.update(info, reference_logps_max_relative_error=relative_error(theirs, ours_reference), step=step)
    return out, tmp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    p.add_argument("--small", action="store_true", help="short sequences and few rows (a CPU smoke run)")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed engine checks")
    p.add_argument("--no-trl", action="store_true", help="leave TRL's DPOTrainer out of the throughput")
    p.add_argument("--only-throughput", action="store_true",
                   help="run the throughput (figure 6) alone, not the scorer/sampler/train/DeepSpeed checks")
    args = p.parse_args(argv)
    scale = 1 if args.small else 8
    args.shape = {**SMOLLM2_135M, "vocab_size": SMALL_VOCAB} if args.small else SMOLLM2_135M
    args.pairs, args.prompts, args.train_pairs, args.n = 4 * scale, 2 * scale, 2 * scale, 4
    args.prompt_len, args.completion_len, args.new_tokens = (16, 12, 8) if args.small else (64, 128, 128)
    args.steps, args.lr = 4, 1e-3
    args.tp_pairs, args.tp_prompt_len, args.tp_completion_len = (2, 16, 12) if args.small else (16, 256, 256)
    args.tp_warmup, args.tp_steps = (1, 2) if args.small else (2, 6)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; use --device cpu for a CPU run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    started = time.time()
    checks = {}
    if not args.only_throughput:
        reference_cpu = build_model(args.layers, torch.float32, "cpu", shape=args.shape).eval()
        model = build_model(args.layers, dtype, args.device, shape=args.shape).eval()
        checks = {"scorer": check_scorer(args, reference_cpu, model), "sampler": check_sampler(args, model)}
        del model, reference_cpu
        checks["train_step"] = check_train_step(args, dtype)
    # Timed before DeepSpeed: ZeRO-3 replaces torch.nn.functional.linear for the rest of the process ("This will
    # persist unless manually reset", deepspeed.runtime.zero.partition_parameters), and the timed steps ran
    # through its LinearFunctionForZeroStage3.
    checks["throughput"] = check_throughput(args, dtype)
    if not args.only_throughput and not args.no_deepspeed:
        for stage in (2, 3):
            checks[f"deepspeed_zero{stage}"] = check_deepspeed(args, stage, checks["train_step"]["cpu_fp32_first_loss"])
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype, "layers": args.layers, "small": args.small, "torch": torch.__version__,
        "transformers": transformers.__version__, "seconds": time.time() - started,
        "ok": all(c["ok"] for c in checks.values()), "checks": checks,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, c in checks.items():
        print(f"{name:10s} {'ok' if c['ok'] else 'FAILED'}  " + json.dumps({k: v for k, v in c.items() if k != "ok"}))
    print(f"wrote {args.out} in {report['seconds']:.0f}s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
