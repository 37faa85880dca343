"""The DPO loss family (Rafailov et al., 2023, and its common variants), as pure PyTorch.

All inputs are log-probabilities summed over completion tokens only, shape (B,) for B preference pairs.
With the log-ratio margin

    z = (logp_chosen - logp_rejected) - (ref_chosen - ref_rejected)

the per-pair losses are
    sigmoid (DPO):          -log σ(βz)
    sigmoid + smoothing ε:  -(1-ε) log σ(βz) - ε log σ(-βz)         (conservative DPO)
    ipo:                    (z - 1/(2β))²                            (Azar et al., 2023)
    hinge:                  max(0, 1 - βz)                           (SLiC)
and the implicit rewards are β(logp - ref_logp), detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

# The config's train.loss and frontier.losses have this type: an unknown loss name is a config error when the
# config is loaded, not a failure once training has started.
LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES = get_args(LossType)


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
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return DPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards)


def nll_loss(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Mean per-token negative log-likelihood of the chosen completions, the RPO term; inputs (B,)."""
    return -(chosen_logps / chosen_tokens.clamp(min=1)).mean()


def dpo_objective(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, chosen_tokens: Tensor, beta: float, loss_type: LossType = "sigmoid",
                  label_smoothing: float = 0.0, rpo_alpha: float = 0.0) -> DPOOutput:
    """The preference loss plus, when rpo_alpha > 0, rpo_alpha times the NLL of the chosen completions."""
    out = preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta, loss_type, label_smoothing)
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
