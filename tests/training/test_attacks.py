"""Behaviour of the attack engine on a briefly trained real model: budgets, quantisation, targets, signs."""

import pytest
import torch

from models.cushion import JpegCushion, NoCushion
from training.attacks import (CWObjective, Objective, PGDConfig, CushionedModel, ShieldOnlyObjective, WhiteBoxObjective,
                              cw_margin, pgd, target_shield, through_cushion)
from training.attacks.engine import _orthogonal

EPS = 16 / 256  # the paper's budget; this 32 px model resists much smaller ones


def _assert_valid(x_adv, x, eps):
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv, torch.round(x_adv * 255) / 255), "adversarial images must be uint8 levels"
    assert (x_adv - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("cushion", [NoCushion(), JpegCushion(quality=80)])
def test_pgd_stays_in_linf_ball_and_reaches_the_target(small_net, batch, cushion):
    x, _, target = batch
    torch.manual_seed(0)
    result = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=EPS, steps=20), cushion=cushion)
    _assert_valid(result.x_adv, x, EPS)
    with torch.no_grad():
        judged = small_net.classifier(through_cushion(result.x_adv, cushion)).argmax(1)
    assert torch.equal(judged == target, result.success), "reported success must match a fresh judgement"
    assert result.success.float().mean() >= 0.9


def test_noise_at_the_same_budget_does_not_reach_the_target(small_net, batch):
    """The comparison that makes the test above meaningful: a random perturbation rarely flips the label."""
    x, _, target = batch
    torch.manual_seed(0)
    noisy = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    with torch.no_grad():
        assert (small_net.classifier(noisy).argmax(1) == target).float().mean() < 0.5


def test_target_margin_rises_during_the_attack(small_net, batch):
    x, _, target = batch
    result = pgd(small_net.classifier, x, target, CWObjective(kappa=50), PGDConfig(eps=EPS, steps=10,
                                                                                  random_start=False))
    assert result.losses[-1] < result.losses[0] - 1.0
    with torch.no_grad():
        before = -cw_margin(small_net.classifier(x), target, 50)
        after = -cw_margin(small_net.classifier(result.x_adv), target, 50)
    assert (after > before).float().mean() >= 0.95


def test_more_steps_never_weaken_the_attack(small_net, batch):
    """Same step size, no random start: the longer run's trajectory contains the shorter one, and the best iterate
    is kept, so it can only do at least as well."""
    x, _, target = batch
    small_eps = 1 / 256
    short = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=small_eps, steps=5, step_size=0.5 / 256,
                                                                        random_start=False))
    long = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=small_eps, steps=50, step_size=0.5 / 256,
                                                                       random_start=False))
    assert long.success.sum() >= short.success.sum()
    assert (long.success | ~short.success).all()


def test_small_steps_are_not_erased_by_rounding(small_net, batch):
    """100 steps smaller than half a grey level must still move the image (`attacks-reference.md` §0.1)."""
    x, _, target = batch
    result = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=16 / 256, steps=100,
                                                                        step_size=0.4 / 255, random_start=False))
    assert (result.x_adv - x).abs().max() >= 10 / 255
    assert result.success.float().mean() >= 0.9


def test_fgsm_is_one_full_sign_step(small_net, batch):
    x, _, target = batch
    result = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=4 / 255, steps=1, step_size=4 / 255,
                                                                        random_start=False))
    changed = (result.x_adv - x).abs()
    _assert_valid(result.x_adv, x, 4 / 255)
    assert ((changed == 0) | ((changed - 4 / 255).abs() < 1e-6)).float().mean() > 0.95


def test_l2_attack_respects_its_budget_after_quantisation(small_net, batch):
    x, _, target = batch
    eps = 1.0
    result = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=eps, steps=20, norm="l2"))
    norms = (result.x_adv - x).flatten(1).norm(dim=1)
    # the projection keeps the uint8 rounding of the iterate inside the ball, so no rounding slack is needed
    assert (norms <= eps + 1e-6).all()
    assert result.success.float().mean() >= 0.8


def test_bpda_gradient_through_the_jpeg_cushion_is_identity_and_non_zero(batch):
    x, _, _ = batch
    x = x[:4].clone().requires_grad_(True)
    out = through_cushion(x, JpegCushion(quality=80))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(x.grad, weights)
    assert not torch.equal(out.detach(), x.detach())  # the forward pass really compressed


def test_shield_objective_raises_the_target_shield_logit(small_net, batch):
    x, _, target = batch
    with torch.no_grad():
        before = target_shield(small_net(x)[1], target)
    result = pgd(small_net, x, target, ShieldOnlyObjective(), PGDConfig(eps=EPS, steps=30))
    with torch.no_grad():
        after = target_shield(small_net(result.x_adv)[1], target)
    assert (after > before).float().mean() >= 0.9


def test_white_box_attack_buys_shield_logit_that_a_label_only_attack_does_not(small_net, batch):
    x, _, target = batch
    # No Cushion: the untrained Shield's logit moves by ~1e-3, below the noise of BPDA through JPEG.
    config = PGDConfig(eps=EPS, steps=30)
    torch.manual_seed(0)
    wb = pgd(small_net, x, target, WhiteBoxObjective(kappa=0), config)
    torch.manual_seed(0)
    label_only = pgd(small_net, x, target, CWObjective(kappa=0), config)
    with torch.no_grad():
        logits, wb_shields = small_net(wb.x_adv)
        _, cw_shields = small_net(label_only.x_adv)
    assert target_shield(wb_shields, target).mean() > target_shield(cw_shields, target).mean()
    assert (logits.argmax(1) == target).float().mean() >= 0.8


def test_shield_only_objective_ignores_the_label(small_net, batch):
    x, _, target = batch
    objective = ShieldOnlyObjective()
    logits, shields = small_net(x)
    label, detector = objective.losses(logits, shields, target)
    assert torch.equal(label, torch.zeros(len(x)))
    assert torch.equal(detector, -target_shield(shields, target))


def test_success_requires_acceptance_when_thresholds_are_given(small_net, batch):
    x, _, target = batch
    with torch.no_grad():
        logits, shields = small_net(x)
    impossible = torch.full((2,), 1e9)
    assert not Objective(thresholds=impossible).success(logits, shields, target).any()
    trivial = torch.full((2,), -1e9)
    assert torch.equal(Objective(thresholds=trivial).success(logits, shields, target), logits.argmax(1) == target)


@pytest.mark.parametrize("direction", ["selective", "orthogonal"])
def test_two_objective_directions_stay_in_budget_and_reach_the_label(small_net, batch, direction):
    x, _, target = batch
    result = pgd(small_net, x, target, WhiteBoxObjective(kappa=5), PGDConfig(eps=EPS, steps=20, direction=direction),
                 cushion=JpegCushion())
    _assert_valid(result.x_adv, x, EPS)
    assert result.label_reached.float().mean() >= 0.8


def test_orthogonal_projection_removes_the_other_direction():
    u, v = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    w = _orthogonal(u, v)
    assert torch.allclose((w * v).flatten(1).sum(1), torch.zeros(5), atol=1e-5)


def test_attack_restores_each_module_mode(small_net, batch):
    x, _, target = batch
    small_net.classifier.eval()
    small_net.shields.train()
    try:
        pgd(CushionedModel(small_net), x[:2], target[:2], Objective(), PGDConfig(eps=EPS, steps=1))
        assert not small_net.classifier.training and small_net.shields.training
    finally:
        small_net.eval()


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="eps"):
        PGDConfig(eps=0, steps=10)
    with pytest.raises(ValueError, match="steps"):
        PGDConfig(eps=0.1, steps=0)
