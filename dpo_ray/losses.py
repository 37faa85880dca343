"""The DPO loss family (Rafailov et al., 2023, and its common variants), as pure PyTorch.

All inputs are log-probabilities summed over completion tokens only, shape (B,) for B preference pairs, and the
completions' token counts |y|, shape (B,). With the log-ratio margin

    z = (logp_chosen - logp_rejected) - (ref_chosen - ref_rejected)

(each log-prob divided by its |y| first under length_normalize) the per-pair losses are
    sigmoid (DPO):          -log σ(βz)
    sigmoid + smoothing ε:  -(1-ε) log σ(βz) - ε log σ(-βz)         (conservative DPO)
    ipo:                    (z - 1/(2β))²                            (Azar et al., 2023)
    hinge:                  max(0, 1 - βz)                           (SLiC)
and the implicit rewards are β(logp - ref_logp), detached. Two losses need no reference; with the mean per-token
log-prob m = logp/|y|:
    simpo:  -log σ(β(m_chosen - m_rejected) - γ)                     (Meng et al., 2024; smoothing as for sigmoid)
    orpo:   -m_chosen - β log σ(odds_chosen - odds_rejected),         (Hong et al., 2024; β is ORPO's λ)
            odds = log(p/(1-p)) = m - log(1 - e^m) with p = e^m
and their rewards are β·m, detached, as TRL reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

# The config's train.loss and frontier.losses have this type: an unknown loss name is a config error when the
# config is loaded, not a failure once training has started.
LossType = Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"]
LOSS_TYPES = get_args(LossType)
# Losses computed from the policy alone: the pipeline runs no reference stage for them.
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOOutput:
    loss: Tensor  # () mean over pairs, the value to backpropagate
    losses: Tensor  # (B,) per pair
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


def preference_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, beta: float, loss_type: LossType = "sigmoid",
                    label_smoothing: float = 0.0) -> DPOOutput:
    """Per-pair preference losses and implicit rewards; all tensors (B,)."""
    z = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * z, label_smoothing)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"loss_type {loss_type!r}: preference_loss computes sigmoid, ipo and hinge")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return DPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards)


def _smoothed_sigmoid_loss(margin: Tensor, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing


def _log_odds(mean_logps: Tensor) -> Tensor:
    # log(p / (1 - p)) with p = e^m; log(1 - e^m) as log(-expm1(m)): exact for m near 0, where 1 - e^m cancels.
    return mean_logps - torch.log(-torch.expm1(mean_logps))


def nll_loss(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Mean per-token negative log-likelihood of the chosen completions, the RPO term; inputs (B,)."""
    return -(chosen_logps / chosen_tokens.clamp(min=1)).mean()


def simpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> DPOOutput:
    """SimPO on mean per-token log-probs, (B,) each."""
    losses = _smoothed_sigmoid_loss(beta * (chosen_mean_logps - rejected_mean_logps) - gamma, label_smoothing)
    return DPOOutput(losses.mean(), losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach())


def orpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float) -> DPOOutput:
    """ORPO on mean per-token log-probs, (B,) each: the chosen NLL plus beta times the odds-ratio loss."""
    losses = -chosen_mean_logps - beta * F.logsigmoid(_log_odds(chosen_mean_logps) - _log_odds(rejected_mean_logps))
    return DPOOutput(losses.mean(), losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach())


def dpo_objective(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
                  ref_rejected_logps: Tensor | None, chosen_tokens: Tensor, rejected_tokens: Tensor, beta: float,
                  loss_type: LossType = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                  simpo_gamma: float = 0.5, length_normalize: bool = False) -> DPOOutput:
    """train.loss on summed log-probs and token counts (B,) plus, when rpo_alpha > 0, rpo_alpha times the NLL of
    the chosen completions; the reference log-probs may be None for a REFERENCE_FREE loss."""
    chosen_len, rejected_len = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    policy = (policy_chosen_logps, policy_rejected_logps)
    reference = (ref_chosen_logps, ref_rejected_logps)
    if loss_type in REFERENCE_FREE or length_normalize:
        policy = (policy[0] / chosen_len, policy[1] / rejected_len)
    if loss_type == "simpo":
        out = simpo_loss(*policy, beta, simpo_gamma, label_smoothing)
    elif loss_type == "orpo":
        out = orpo_loss(*policy, beta)
    else:
        if length_normalize:
            reference = (reference[0] / chosen_len, reference[1] / rejected_len)
        out = preference_loss(*policy, *reference, beta, loss_type, label_smoothing)
    if rpo_alpha > 0:
        out.loss = out.loss + rpo_alpha * nll_loss(policy_chosen_logps, chosen_tokens)
    return out


def reward_metrics(out: DPOOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict:
    """The per-step metrics under the names TRL users know, averaged over the batch."""
    return {
        "loss": out.loss.item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }
