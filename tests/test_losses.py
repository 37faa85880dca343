"""dpo_ray.losses against the formulas of its docstring, computed by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ray.losses import dpo_objective, orpo_loss, preference_loss, reward_metrics, simpo_loss

# Three pairs with distinct margins z = (pc - pr) - (rc - rr): 0.7, -1.5, 2.5.
PC = [-10.0, -12.5, -3.0]
PR = [-11.0, -12.0, -7.5]
RC = [-10.5, -12.0, -4.0]
RR = [-10.8, -13.0, -6.0]
BETA = 0.5


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def margins():
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_margins_are_distinct_and_signed():
    z = margins()
    assert z == pytest.approx([0.7, -1.5, 2.5])


def test_sigmoid_matches_hand_values():
    expected = [-log_sigmoid(BETA * z) for z in margins()]
    out = preference_loss(t(PC), t(PR), t(RC), t(RR), BETA, "sigmoid")
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_label_smoothing(eps):
    expected = [-(1 - eps) * log_sigmoid(BETA * z) - eps * log_sigmoid(-BETA * z) for z in margins()]
    out = preference_loss(t(PC), t(PR), t(RC), t(RR), BETA, "sigmoid", label_smoothing=eps)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)
    # Smoothing changes the loss relative to plain DPO.
    plain = preference_loss(t(PC), t(PR), t(RC), t(RR), BETA, "sigmoid")
    assert not torch.allclose(out.losses, plain.losses)


def test_ipo_matches_hand_values():
    expected = [(z - 1 / (2 * BETA)) ** 2 for z in margins()]
    out = preference_loss(t(PC), t(PR), t(RC), t(RR), BETA, "ipo")
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)


def test_hinge_matches_hand_values():
    expected = [max(0.0, 1 - BETA * z) for z in margins()]
    assert expected[2] == 0.0 and expected[0] > 0 and expected[1] > 0  # one pair outside the active region
    out = preference_loss(t(PC), t(PR), t(RC), t(RR), BETA, "hinge")
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_implicit_rewards(loss_type):
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    out = preference_loss(pc, pr, t(RC), t(RR), BETA, loss_type)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * (a - b) for a, b in zip(PC, RC)], rel=1e-10)
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * (a - b) for a, b in zip(PR, RR)], rel=1e-10)
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    assert out.loss.requires_grad


def test_policy_equal_to_reference_gives_ln2():
    logps_c, logps_r = t([-3.0, -20.0, -7.25]), t([-4.0, -1.0, -9.5])
    for eps in (0.0, 0.2):
        out = preference_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), 0.3, "sigmoid", eps)
        assert out.losses.tolist() == pytest.approx([math.log(2)] * 3, rel=1e-12)
        assert out.loss.item() == pytest.approx(math.log(2), rel=1e-12)
        assert out.chosen_rewards.abs().max().item() == 0.0


def _grads(loss_type, pc, pr, rc, rr, beta):
    pc_t, pr_t = t(pc, grad=True), t(pr, grad=True)
    preference_loss(pc_t, pr_t, t(rc), t(rr), beta, loss_type).loss.backward()
    return pc_t.grad, pr_t.grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    # Margins z = 0.5, -1.0, 0.0 are all below the IPO target 1/(2 beta) = 1 and inside the hinge's active
    # region (beta z < 1), so every loss pushes chosen up and rejected down.
    pc, pr = [-5.0, -8.0, -2.0], [-5.5, -7.0, -3.0]
    rc, rr = [-5.0, -8.0, -2.0], [-5.0, -8.0, -3.0]
    g_c, g_r = _grads(loss_type, pc, pr, rc, rr, BETA)
    assert (g_c < 0).all(), g_c
    assert (g_r > 0).all(), g_r
    # d loss / d chosen = - d loss / d rejected: the loss depends on the margin only.
    torch.testing.assert_close(g_c, -g_r)


def test_sigmoid_gradient_magnitude():
    pc, pr, rc, rr = [-5.0], [-6.0], [-5.5], [-5.0]
    z = (pc[0] - pr[0]) - (rc[0] - rr[0])
    g_c, _ = _grads("sigmoid", pc, pr, rc, rr, BETA)
    # d/dpc of -log sigma(beta z) = -beta * sigma(-beta z)
    assert g_c.item() == pytest.approx(-BETA / (1 + math.exp(BETA * z)), rel=1e-10)


def test_ipo_gradient_pulls_margin_back_above_target():
    # z = 3 > 1/(2 beta) = 1: IPO regresses the margin toward its target, so chosen is pushed down.
    g_c, g_r = _grads("ipo", [-2.0], [-5.0], [-4.0], [-4.0], BETA)
    assert g_c.item() == pytest.approx(2 * (3.0 - 1.0), rel=1e-10)
    assert g_r.item() == pytest.approx(-2 * (3.0 - 1.0), rel=1e-10)


def test_hinge_gradient_zero_outside_active_region():
    g_c, g_r = _grads("hinge", [-1.0], [-9.0], [-4.0], [-4.0], BETA)  # beta z = 4 > 1
    assert g_c.item() == 0.0 and g_r.item() == 0.0


def test_dpo_objective_rpo_term():
    tokens = torch.tensor([4, 5, 2])
    alpha = 0.7
    plain = dpo_objective(t(PC), t(PR), t(RC), t(RR), tokens, tokens, BETA, "sigmoid")
    rpo = dpo_objective(t(PC), t(PR), t(RC), t(RR), tokens, tokens, BETA, "sigmoid", rpo_alpha=alpha)
    nll = sum(-pc / n for pc, n in zip(PC, [4, 5, 2])) / 3
    expected = sum(-log_sigmoid(BETA * z) for z in margins()) / 3
    assert plain.loss.item() == pytest.approx(expected, rel=1e-10)
    assert rpo.loss.item() == pytest.approx(expected + alpha * nll, rel=1e-10)
    # The per-pair preference losses and rewards are untouched by the RPO term.
    torch.testing.assert_close(rpo.losses, plain.losses)
    torch.testing.assert_close(rpo.chosen_rewards, plain.chosen_rewards)


def test_dpo_objective_rpo_gradient_reaches_chosen():
    tokens = torch.tensor([4, 5, 2])
    pc0, pc1 = t(PC, grad=True), t(PC, grad=True)
    dpo_objective(pc0, t(PR), t(RC), t(RR), tokens, tokens, BETA).loss.backward()
    dpo_objective(pc1, t(PR), t(RC), t(RR), tokens, tokens, BETA, rpo_alpha=0.5).loss.backward()
    # The NLL term adds -alpha / (B * tokens) to each chosen gradient.
    extra = torch.tensor([-0.5 / (3 * n) for n in (4, 5, 2)], dtype=torch.float64)
    torch.testing.assert_close(pc1.grad - pc0.grad, extra)


def test_reward_metrics_names_and_values():
    # Rewards (beta = 1): chosen 1.0, 0.5, -1.0; rejected -1.0, 0.5, 0.0 -> one win, one tie, one loss.
    pc, pr = t([-1.0, -2.0, -4.0]), t([-3.0, -2.5, -6.0])
    rc, rr = t([-2.0, -2.5, -3.0]), t([-2.0, -3.0, -6.0])
    out = dpo_objective(pc, pr, rc, rr, torch.tensor([3, 3, 3]), torch.tensor([3, 3, 3]), 1.0)
    m = reward_metrics(out, pc, pr)
    assert set(m) == {
        "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected",
    }
    assert all(isinstance(v, float) for v in m.values())
    assert m["loss"] == pytest.approx(out.loss.item())
    assert m["rewards/chosen"] == pytest.approx((1.0 + 0.5 - 1.0) / 3)
    assert m["rewards/rejected"] == pytest.approx((-1.0 + 0.5 + 0.0) / 3)
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)  # a tie is not a win
    assert m["rewards/margins"] == pytest.approx((2.0 + 0.0 - 1.0) / 3)
    assert m["logps/chosen"] == pytest.approx(-7.0 / 3)
    assert m["logps/rejected"] == pytest.approx(-11.5 / 3)


def test_invalid_loss_type_raises():
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(t(PC), t(PR), t(RC), t(RR), BETA, "kto")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_objective(t(PC), t(PR), t(RC), t(RR), torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]), BETA, "Sigmoid")


# Token counts of the chosen and rejected completions of the three pairs, for the length-normalized losses.
NC, NR = [4, 5, 2], [3, 6, 5]


def tokens(counts):
    return torch.tensor(counts)


def test_length_normalize_divides_policy_and_reference_by_token_counts():
    out = dpo_objective(t(PC), t(PR), t(RC), t(RR), tokens(NC), tokens(NR), BETA, "ipo", length_normalize=True)
    z = [(pc / nc - pr / nr) - (rc / nc - rr / nr) for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR)]
    assert out.losses.tolist() == pytest.approx([(x - 1 / (2 * BETA)) ** 2 for x in z], rel=1e-10)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * (pc - rc) / n for pc, rc, n in zip(PC, RC, NC)])
    summed = dpo_objective(t(PC), t(PR), t(RC), t(RR), tokens(NC), tokens(NR), BETA, "ipo")
    assert summed.losses.tolist() == pytest.approx([(x - 1 / (2 * BETA)) ** 2 for x in margins()], rel=1e-10)


def test_simpo_matches_hand_values_and_ignores_the_reference():
    gamma, eps = 0.8, 0.1
    m = [(pc / nc - pr / nr) for pc, pr, nc, nr in zip(PC, PR, NC, NR)]
    expected = [-(1 - eps) * log_sigmoid(BETA * x - gamma) - eps * log_sigmoid(gamma - BETA * x) for x in m]
    out = dpo_objective(t(PC), t(PR), None, None, tokens(NC), tokens(NR), BETA, "simpo", label_smoothing=eps,
                        simpo_gamma=gamma)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * pc / n for pc, n in zip(PC, NC)])
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * pr / n for pr, n in zip(PR, NR)])


def test_orpo_matches_hand_values():
    def log_odds(mean_logp):
        return mean_logp - math.log(1 - math.exp(mean_logp))

    expected = [-pc / nc - BETA * log_sigmoid(log_odds(pc / nc) - log_odds(pr / nr))
                for pc, pr, nc, nr in zip(PC, PR, NC, NR)]
    out = dpo_objective(t(PC), t(PR), None, None, tokens(NC), tokens(NR), BETA, "orpo")
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)


def test_orpo_is_finite_where_a_completion_is_almost_certain():
    # Mean log-probs of -1e-9: 1 - e^m cancels to 0 in a naive log(1 - exp(m)); log(-expm1(m)) does not.
    out = orpo_loss(t([-1e-9, -0.5], grad=True), t([-2.0, -1e-9]), 1.0)
    out.loss.backward()
    assert torch.isfinite(out.losses).all()


def test_simpo_and_orpo_push_chosen_up_and_rejected_down():
    for loss in (lambda c, r: simpo_loss(c, r, BETA, 0.5), lambda c, r: orpo_loss(c, r, BETA)):
        chosen, rejected = t([-1.2, -2.0], grad=True), t([-1.5, -0.7], grad=True)
        loss(chosen, rejected).loss.backward()
        assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
