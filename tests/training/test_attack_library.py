"""Behaviour of the named attacks (`training.attacks.library`): budgets, verdicts, strength orderings, the hooks
(DIM, TIM, differentiable JPEG, EOT), the feature-space objectives, and a cross-check against torchattacks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.cushion import JpegCushion
from training.attacks import (ATTACKS, DiffJpeg, DiverseInput, GaussianSmoothing, HFCObjective, Objective, PGDConfig,
                              CushionedModel, RandomTranslate, build_attack, eps_sweep, exact_cushion, fit_hfc_mixtures,
                              gaussian_kernel, judge, nearest_guides, pgd, quantise, through_cushion)
from training.attacks.engine import _gradient
from training.evaluate import attack_suite

LINF = 16 / 256


@pytest.fixture(scope="module")
def images(batch):
    """16 correctly classified test images and their targets (the other class)."""
    x, _, target = batch
    return x[:16], target[:16]


@pytest.fixture(scope="module")
def guide_pool(xray_data):
    x, y, _, _ = xray_data
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:120]  # the data are sorted by class
    return x[chosen], y[chosen]


@pytest.fixture(scope="module")
def hfc_mixtures(small_net, guide_pool):
    return fit_hfc_mixtures(small_net, *guide_pool, cushion=JpegCushion(), layers=(1, 3, 5))


def _options(name, small_net, guide_pool, hfc_mixtures):
    if name.startswith("transfer"):
        return {"substitute": small_net.classifier}
    if name.startswith("fea"):
        return {"guide_pool": guide_pool}
    if name.startswith("hfc"):
        return {"mixtures": hfc_mixtures}
    if name == "cw_l2":
        return {"search_steps": 2}
    if name in ("wb_eot", "wb_eot_cushion"):
        return {"eot_samples": 2}
    return {}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stays_in_its_budget_on_the_uint8_grid_and_reports_a_true_verdict(
        name, small_net, images, thresholds, guide_pool, hfc_mixtures):
    x, target = images[0][:4], images[1][:4]
    eps = 8 / 256 if ATTACKS[name].eps is None else None  # CW-L2 is unbounded unless given a budget
    spec = build_attack(name, eps=eps, steps=3, thresholds=thresholds,
                        **_options(name, small_net, guide_pool, hfc_mixtures))
    torch.manual_seed(0)
    result = spec(small_net, x, target, JpegCushion())
    assert torch.equal(result.x_adv, quantise(result.x_adv)), "adversarial images must be uint8 levels"
    delta = result.x_adv - x
    if spec.norm == "linf":
        assert delta.abs().max() <= spec.eps + 1e-6
    else:  # exact, after rounding: the L2 projection keeps the rounded image inside the ball
        assert (delta.flatten(1).norm(dim=1) <= spec.eps + 1e-6).all()
    objective = Objective(thresholds=thresholds if name not in _SHIELD_BLIND else None)
    success, reached = judge(small_net, result.x_adv, target, objective, JpegCushion())
    assert torch.equal(success, result.success) and torch.equal(reached, result.label_reached)


_SHIELD_BLIND = {"fgsm", "bim", "pgd_linf", "pgd_l2", "mim", "dim", "tim", "cw_linf", "cw_l2", "apgd_ce"}


@pytest.mark.parametrize("name", ["pgd_linf", "apgd_ce"])
def test_pgd_and_apgd_reach_the_target_on_the_bare_classifier(name, small_net, images):
    x, target = images
    torch.manual_seed(0)
    result = build_attack(name, eps=LINF, steps=10)(small_net.classifier, x, target)
    assert result.success.float().mean() >= 0.9


def test_apgd_is_at_least_as_strong_as_pgd_with_equal_steps(small_net, images):
    x, target = images
    eps = 3 / 255  # a budget that leaves PGD short of 100% on this model
    torch.manual_seed(0)
    plain = build_attack("pgd_linf", eps=eps, steps=10)(small_net.classifier, x, target)
    torch.manual_seed(0)
    adaptive = build_attack("apgd_ce", eps=eps, steps=10)(small_net.classifier, x, target)
    assert plain.success.float().mean() < 1.0, "the budget should leave room to compare"
    assert adaptive.success.sum() >= plain.success.sum()


def test_more_restarts_never_weaken_the_attack(small_net, images):
    """The first restart replays the single run (same seed); the best iterate over restarts is kept."""
    x, target = images
    torch.manual_seed(0)
    once = build_attack("pgd_linf", eps=3 / 255, steps=5)(small_net.classifier, x, target)
    torch.manual_seed(0)
    thrice = build_attack("pgd_linf", eps=3 / 255, steps=5, restarts=3)(small_net.classifier, x, target)
    assert (thrice.success | ~once.success).all()


def test_our_targeted_pgd_agrees_with_torchattacks(small_net, images):
    """Cross-check with code we did not write: same eps (a whole number of grey levels, so that both reach the
    same uint8 images), steps, step size and random start, bare classifier, targeted."""
    torchattacks = pytest.importorskip("torchattacks")
    x, target = images
    eps, steps = 3 / 255, 10
    torch.manual_seed(0)
    ours = pgd(small_net.classifier, x, target, Objective(), PGDConfig(eps=eps, steps=steps))
    attack = torchattacks.PGD(small_net.classifier, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    attack.set_mode_targeted_by_label(quiet=True)  # labels passed to the attack are then the targets
    torch.manual_seed(0)
    theirs = quantise(attack(x, target))
    with torch.no_grad():
        their_success = small_net.classifier(theirs).argmax(1) == target
    assert (theirs - x).abs().max() <= eps + 1e-6
    assert abs(int(ours.success.sum()) - int(their_success.sum())) <= 2


def test_diff_jpeg_surrogate_keeps_the_exact_forward_and_changes_the_gradient(images):
    x = images[0][:4].clone().requires_grad_(True)
    cushion = JpegCushion(quality=80)
    out = through_cushion(x, cushion, DiffJpeg(80.0))
    assert torch.allclose(out, exact_cushion(x, cushion), atol=1e-6)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert x.grad.abs().sum() > 0
    assert not torch.allclose(x.grad, weights, atol=1e-3), "the backward pass must be the surrogate's, not identity"
    with torch.no_grad():  # the grayscale route models Pillow's "L" JPEG closely (PSNR measured ~47 dB)
        mse = (DiffJpeg(80.0)(x) - exact_cushion(x, cushion)).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 40


def test_eot_averages_the_gradient_over_random_draws(small_net, images):
    """The engine's EOT gradient is the mean of the per-draw gradients (same draws, replayed by the seed); the
    random-quality surrogate really is random."""
    x, target = images[0][:4], images[1][:4]
    surrogate, transform = DiffJpeg((70.0, 90.0)), RandomTranslate(2)
    pipeline = CushionedModel(small_net.classifier, JpegCushion(), surrogate)
    config = PGDConfig(eps=LINF, steps=1, eot_samples=3, transform=transform)
    torch.manual_seed(0)
    grad, *_ = _gradient(pipeline, x, target, Objective(), config)
    torch.manual_seed(0)
    draws = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        loss = F.cross_entropy(pipeline(transform(xi))[0], target, reduction="sum")
        draws.append(torch.autograd.grad(loss, xi)[0])
    assert torch.allclose(grad, torch.stack(draws).mean(0), atol=1e-6)
    assert not torch.allclose(draws[0], draws[1])
    torch.manual_seed(0)
    assert not torch.equal(surrogate(x), surrogate(x))


def test_input_diversity_and_tim_smoothing_have_the_right_shapes():
    x = torch.rand(3, 1, 32, 32)
    torch.manual_seed(0)
    diverse = DiverseInput(p=1.0)(x)
    assert diverse.shape == x.shape and not torch.equal(diverse, x)
    assert (diverse == 0).any(), "the shrunk image is zero-padded back to full size"
    assert torch.equal(DiverseInput(p=0.0)(x), x)
    kernel = gaussian_kernel(7, 3.0)
    assert kernel.shape == (7, 7) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert torch.allclose(kernel, kernel.T) and kernel.argmax() == 24  # symmetric, peaked in the centre
    grad = torch.rand(2, 3, 16, 16)
    smoothed = GaussianSmoothing(7)(grad)
    assert smoothed.shape == grad.shape
    assert torch.allclose(GaussianSmoothing(7)(torch.ones(1, 3, 16, 16))[..., 3:-3, 3:-3], torch.ones(1, 3, 10, 10))


def test_the_smoothed_gradient_gives_a_lower_frequency_perturbation_on_the_same_objective(small_net, images):
    """wb_n1_ti is wb_n1 with TI's Gaussian gradient filter: neighbouring pixels of its perturbation move together
    (the low-frequency images that pass 2.2.0's Shields in Table 3), where wb_n1's sign steps are pixel-wise."""
    x = images[0][:8]
    target = images[1][:8]
    thresholds = torch.zeros(2)

    def roughness(name: str) -> float:  # mean |difference| between horizontal neighbours, per unit of budget
        torch.manual_seed(0)
        delta = build_attack(name, eps=LINF, steps=10, thresholds=thresholds)(small_net, x, target).x_adv - x
        return float((delta[..., 1:] - delta[..., :-1]).abs().mean() / delta.abs().mean())

    assert roughness("wb_n1_ti") < 0.75 * roughness("wb_n1")  # independent pixels: ~1.1 (measured 0.71 vs 1.13)


def test_fea_moves_the_tapped_features_towards_the_guide(small_net, images, guide_pool):
    x, target = images[0][:8], images[1][:8]
    taps = tuple(small_net.classifier.taps)
    cushion = JpegCushion()
    guides = nearest_guides(small_net, x, target, *guide_pool, taps, cushion)

    def distance(images):
        with torch.no_grad():
            _, _, features = CushionedModel(small_net, cushion)(images, taps)
        return sum(((f - g) ** 2).flatten(1).mean(1) for f, g in zip(features, guides))

    torch.manual_seed(0)
    result = build_attack("fea", steps=10, guide_pool=guide_pool)(small_net, x, target, cushion)
    assert (distance(result.x_adv) < distance(x)).float().mean() >= 0.9


def test_hfc_pulls_the_pooled_features_into_the_target_mixture(small_net, images, hfc_mixtures):
    """Against plain PGD with the same budget, steps and seed, HFC ends closer to the target class's mixture."""
    x, target = images[0][:8], images[1][:8]
    layers, mixtures = hfc_mixtures
    constraint = HFCObjective(feature_layers=layers, mixtures=mixtures)
    cushion = JpegCushion()

    def hfc_loss(images):
        with torch.no_grad():
            logits, shields, features = CushionedModel(small_net, cushion)(images, layers)
        return constraint.losses(logits, shields, target, features)[1]

    torch.manual_seed(0)
    hfc = build_attack("hfc", steps=10, mixtures=hfc_mixtures)(small_net, x, target, cushion)
    torch.manual_seed(0)
    plain = pgd(small_net, x, target, Objective(), PGDConfig(eps=LINF, steps=10, step_size=2 / 256),
                cushion=cushion)
    assert hfc_loss(hfc.x_adv).mean() < hfc_loss(plain.x_adv).mean()
    assert hfc_loss(hfc.x_adv).mean() < hfc_loss(x).mean()


def test_cw_l2_finds_smaller_perturbations_than_a_linf_attack(small_net, images):
    x, target = images[0][:8], images[1][:8]
    result = build_attack("cw_l2", steps=60, search_steps=3)(small_net.classifier, x, target)
    torch.manual_seed(0)
    linf = build_attack("pgd_linf", eps=LINF, steps=10)(small_net.classifier, x, target)
    both = result.success & linf.success
    assert result.success.float().mean() >= 0.75 and both.any()
    l2 = (result.x_adv - x).flatten(1).norm(dim=1)
    assert (l2[both] < (linf.x_adv - x).flatten(1).norm(dim=1)[both]).all()


def test_transfer_is_judged_on_the_target_not_the_substitute(small_net, images):
    x, target = images[0][:8], images[1][:8]
    impossible = torch.full((2,), 1e9)  # no image is accepted by the target's Shields at these thresholds
    spec = build_attack("transfer_vgg16", steps=5, thresholds=impossible, substitute=small_net.classifier)
    torch.manual_seed(0)
    result = spec(small_net, x, target, JpegCushion())
    assert result.label_reached.any() and not result.success.any()


def test_eps_sweep_rises_to_full_success(small_net, images):
    x, target = images
    rows = eps_sweep("bim", [1 / 255, 4 / 255, 32 / 255], small_net.classifier, x, target, steps=5)
    rates = [r["success_rate"] for r in rows]
    assert rates == sorted(rates) and rates[-1] == 1.0


def test_registry_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("pgd_linf_typo")
    with pytest.raises(ValueError, match="thresholds"):
        build_attack("wb")
    with pytest.raises(ValueError, match="substitute"):
        build_attack("transfer_vgg16")
    with pytest.raises(TypeError):
        build_attack("fgsm", kappa=5)  # an option the attack does not have is an error, not silently ignored


def test_acceptance_suite_keeps_its_names_and_settings():
    specs = attack_suite(torch.zeros(2), steps=100)
    assert [s.name for s in specs] == ["pgd20", "wb100", "wbd100", "spgd100"]
    assert all(s.eps == LINF and s.norm == "linf" for s in specs)
    assert [s.steps for s in specs] == [20, 100, 100, 100]


@pytest.mark.parametrize("field, value", [("norm", "Linf"), ("direction", "selectiv"), ("optimiser", "adam")])
def test_pgd_config_refuses_a_value_outside_its_choices(field, value):
    with pytest.raises(ValueError, match=f"PGDConfig.{field} must be one of"):
        PGDConfig(eps=16 / 256, steps=1, **{field: value})


def test_report_keys_have_readable_names():
    from training.attacks import long_name

    assert long_name("wb100@4") == f"{ATTACKS['wb'].summary}; 100 steps; ε 4/256"
    assert long_name("wb_n1100").startswith(ATTACKS["wb_n1"].summary)  # not "wb_n" with 1100 steps
    assert long_name("tf10") == f"{ATTACKS['transfer_vgg16'].summary}; 10 steps"
    assert long_name("pgd20").startswith("PGD-L∞")


def test_diff_jpeg_with_a_grid_offset_models_the_randomised_cushion_draw(images):
    """The EOT surrogate of `RandomisedJpegCushion` codes on the same shifted block grid as Pillow does."""
    from models.cushion import jpeg_round_trip, to_uint8

    x = quantise(images[0][:4])
    torch.manual_seed(0)
    dy, dx = (int(v) for v in torch.randint(0, 3, (2,)))
    torch.manual_seed(0)
    with torch.no_grad():
        surrogate = DiffJpeg(80.0, max_grid_shift=2)(x).numpy()
    uint8 = to_uint8(x.numpy()).transpose(0, 2, 3, 1)

    def pillow(offset):
        return np.stack([jpeg_round_trip(im, 80, offset) for im in uint8]).transpose(0, 3, 1, 2) / 255.0

    assert (dy, dx) != (0, 0)  # the seed draws a real offset, else the test says nothing
    assert np.abs(surrogate - pillow((dy, dx))).mean() < 0.5 * np.abs(surrogate - pillow((0, 0))).mean()
