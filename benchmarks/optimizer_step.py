"""The train step's optimizer phase: gradient clipping plus one AdamW step over every SmolLM2-135M weight, with
torch's foreach AdamW (dpo-ray's kernel before 2026-12-06, and what DeepSpeed still gets) against its fused one
(the DDP engine's since), alternately in one process on the same weights and gradients.

Both sides step their own copy of the model from the same weights and the same (seeded) gradients, so their weights
after `--steps` steps are also compared: fused and foreach differ only in rounding.

    .venv/bin/python benchmarks/optimizer_step.py --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import copy

import torch

import common


def side(model: torch.nn.Module, kernel: str, gradients: list[torch.Tensor]):
    params = list(model.parameters())
    for p, g in zip(params, gradients):
        p.grad = g.clone()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **{kernel: True})

    def step(_: int) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return round(float(norm), 6)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    common.set_threads(args.threads)
    _, path = common.load_tokenizer_and_path()
    base = common.load_model(path)
    g = torch.Generator().manual_seed(0)
    gradients = [torch.randn(p.shape, generator=g) * 1e-3 for p in base.parameters()]
    models = {kernel: copy.deepcopy(base) for kernel in ("foreach", "fused")}
    sides = {kernel: side(model, kernel, gradients) for kernel, model in models.items()}
    times, cpu, norms = common.alternate(sides, args.steps)
    result = {kernel: common.summarize(times[kernel], 1, cpu[kernel]) for kernel in sides}
    drift = max((a - b).abs().max().item() for a, b in zip(models["foreach"].parameters(),
                                                            models["fused"].parameters()))
    ratio = result["foreach"]["median_s"] / result["fused"]["median_s"]
    common.log(f"clip + AdamW step over {common.n_params(base) / 1e6:.1f}M weights: foreach "
               f"{result['foreach']['median_s']:.3f} s, fused {result['fused']['median_s']:.3f} s "
               f"({ratio:.2f}x); largest weight difference after {args.steps} steps {drift:.2e}")
    out = common.write_result("optimizer_step", {
        "machine": common.machine_info(), "args": vars(args), "parameters": common.n_params(base), **result,
        "foreach_over_fused": ratio, "max_weight_difference": drift, "grad_norms": norms})
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
