"""Our losses against TRL's own code on the same inputs: a parity check, not a timing (issue 18).

Closed form, no model (B random pairs of varying lengths, float64):
  simpo, with and without label smoothing   vs TRL's CPOTrainer.cpo_loss(loss_type="simpo") on mean log-probs
  orpo's odds-ratio term                    vs TRL's ORPOTrainer.odds_ratio_loss
Through a model (SmolLM2 as the policy, the same weights perturbed as the reference, pairs of varying lengths,
the same token ids on both sides through TRL's own collator):
  sigmoid (summed log-probs)                vs DPOTrainer.compute_loss(loss_type=["sigmoid"])
  ipo with train.length_normalize=true      vs DPOTrainer.compute_loss(loss_type=["ipo"]) (TRL normalizes IPO)
  ipo summed (the DPO authors' code)        vs the same, to show the two conventions differ

TRL's trainers are built only where they must be (DPOTrainer); the closed-form losses are TRL's methods called
with the few attributes they read. Run in the benchmark environment (README.md, Environment):

    .venv-bench/bin/python benchmarks/loss_parity.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import warnings
from types import SimpleNamespace

import torch

import common
from dpo_ray.logprobs import SequenceScorer, shared_prompt_batch
from dpo_ray.losses import dpo_objective

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _max_rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(((ours - theirs).abs() / theirs.abs().clamp(min=1e-12)).max())


def closed_form(pairs: int, seed: int) -> dict:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 200, (pairs,), generator=g)
    rejected_tokens = torch.randint(1, 200, (pairs,), generator=g)
    # Summed log-probs of about -0.05 to -3 nats per token, as text under a small LM.
    chosen = -chosen_tokens * (0.05 + 3 * torch.rand(pairs, generator=g, dtype=torch.float64))
    rejected = -rejected_tokens * (0.05 + 3 * torch.rand(pairs, generator=g, dtype=torch.float64))
    mean_chosen, mean_rejected = chosen / chosen_tokens, rejected / rejected_tokens
    device = SimpleNamespace(device="cpu")
    out = {}
    for beta, gamma, smoothing in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.1)):
        ours = dpo_objective(chosen, rejected, None, None, chosen_tokens, rejected_tokens, beta, "simpo",
                             label_smoothing=smoothing, simpo_gamma=gamma)
        trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma,
                                   label_smoothing=smoothing, accelerator=device)
        losses, chosen_rewards, _ = CPOTrainer.cpo_loss(trl_self, mean_chosen, mean_rejected)
        out[f"simpo_beta{beta:g}_gamma{gamma:g}_eps{smoothing:g}"] = {
            "max_rel_diff_losses": _max_rel(ours.losses, losses),
            "max_rel_diff_rewards": _max_rel(ours.chosen_rewards, chosen_rewards)}
    beta = 0.1
    ours = dpo_objective(chosen, rejected, None, None, chosen_tokens, rejected_tokens, beta, "orpo")
    # TRL returns beta * log sigmoid(log odds ratio) per pair; ours is the chosen NLL minus that.
    trl_ratio, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=device),
                                                mean_chosen, mean_rejected)
    out["orpo_odds_ratio_term"] = {"max_rel_diff": _max_rel(-(ours.losses + mean_chosen), trl_ratio.double()),
                                   "note": "TRL computes this term in float32"}
    return out


def _varied_pairs(tokenizer, n: int, seed: int) -> list[dict]:
    """common.build_pairs with each completion cut to its own length (8-40 tokens), so that length normalization
    matters."""
    rng = random.Random(seed)
    rows = common.build_pairs(tokenizer, n, completion_tokens=40, seed=seed)
    for row in rows:
        for side in ("chosen_ids", "rejected_ids"):
            row[side] = row[side][: rng.randrange(8, 41)]
    return rows


def _perturbed(model, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return model


def through_model(pairs: int, seed: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.text import render_prompt

    tokenizer, path = common.load_tokenizer_and_path()
    rows = _varied_pairs(tokenizer, pairs, seed)
    policy = common.load_model(path)
    reference = _perturbed(common.load_model(path), 0.02, seed)
    batch = shared_prompt_batch([r["prompt_ids"] for r in rows],
                                [(r["chosen_ids"], r["rejected_ids"]) for r in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = SequenceScorer(policy)(**batch)
        ref_logps, _ = SequenceScorer(reference)(**batch)
    mine = {"pc": logps[0::2], "pr": logps[1::2], "rc": ref_logps[0::2], "rr": ref_logps[1::2],
            "nc": counts[0::2], "nr": counts[1::2]}
    data = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"], None, None), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in rows])
    out = {"pairs": pairs, "completion_tokens": sorted({int(c) for c in counts})}
    beta = 0.1
    for trl_loss, ours_kwargs in (("sigmoid", {"loss_type": "sigmoid"}),
                                  ("ipo", {"loss_type": "ipo", "length_normalize": True}),
                                  ("ipo", {"loss_type": "ipo"})):
        args = DPOConfig(output_dir=f"/tmp/loss_parity_{trl_loss}", per_device_train_batch_size=pairs, beta=beta,
                         loss_type=[trl_loss], max_length=None, bf16=False, fp16=False, use_cpu=True,
                         report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                                 processing_class=tokenizer)
        inputs = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                        for r in rows])
        trainer.model.eval()
        with torch.no_grad():
            theirs = float(trainer.compute_loss(trainer.model, inputs))
        ours = float(dpo_objective(mine["pc"], mine["pr"], mine["rc"], mine["rr"], mine["nc"], mine["nr"], beta,
                                   **ours_kwargs).loss)
        name = f"{trl_loss}{'_length_normalized' if ours_kwargs.get('length_normalize') else '_summed'}"
        out[name] = {"ours": ours, "trl": theirs, "rel_diff": abs(ours - theirs) / abs(theirs)}
        common.log(f"{name}: ours {ours:.6f}, TRL {theirs:.6f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=512, help="random pairs for the closed-form losses")
    p.add_argument("--model-pairs", type=int, default=8, help="pairs run through the model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import trl

    result = {"machine": common.machine_info(), "code": common.code_version(), "trl": trl.__version__,
              "closed_form": closed_form(args.pairs, args.seed), "through_model": through_model(args.model_pairs,
                                                                                              args.seed)}
    for name, values in result["closed_form"].items():
        common.log(f"{name}: {values}")
    common.log(f"wrote {common.write_result('loss_parity', result)}")


if __name__ == "__main__":
    main()
