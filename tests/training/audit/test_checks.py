"""The sanity flags fire on synthetic bad results and stay quiet on good ones."""

import torch

from training.audit.checks import Trial, sanity_flags

E = 16 / 256


def kinds(trials):
    return sorted({f["flag"] for f in sanity_flags(trials)})


def test_good_results_raise_no_flag():
    trials = [Trial("wb50", "wb", E, 50, 0.40, 200), Trial("wb100", "wb", E, 100, 0.45, 200),
              Trial("wb100@4", "wb", 4 / 256, 100, 0.05, 200), Trial("wb100@64", "wb", 64 / 256, 100, 0.99, 200),
              Trial("tf", "tf", E, 10, 0.10, 200, kind="transfer")]
    assert kinds(trials) == []


def test_more_steps_weaker_fires_beyond_noise_only():
    assert "more_steps_weaker" in kinds([Trial("a", "wb", E, 10, 0.9, 200), Trial("b", "wb", E, 100, 0.1, 200)])
    assert kinds([Trial("a", "wb", E, 10, 0.50, 20), Trial("b", "wb", E, 100, 0.45, 20)]) == []  # 1 image of 20


def test_large_eps_must_break_the_defence():
    flags = kinds([Trial("wb@16", "wb", E, 100, 0.2, 100), Trial("wb@64", "wb", 64 / 256, 100, 0.5, 100)])
    assert "large_eps_not_broken" in flags


def test_zero_success_at_the_largest_eps_is_flagged():
    assert "zero_at_max_eps" in kinds([Trial("pgd", "pgd", E, 10, 0.0, 100)])


def test_transfer_beating_white_box_is_flagged():
    flags = kinds([Trial("wb", "wb", E, 100, 0.1, 200), Trial("tf", "tf", E, 10, 0.6, 200, kind="transfer")])
    assert "transfer_beats_white_box" in flags


def test_larger_eps_weaker_is_flagged():
    assert "larger_eps_weaker" in kinds([Trial("a", "wb", E, 100, 0.8, 200), Trial("b", "wb", 32 / 256, 100, 0.2, 200)])


def test_a_shield_blind_attack_is_judged_on_its_label_success_not_on_getting_past_the_detector():
    """A detector that catches every conventional attack (APTOS table 3) is not a broken attack; one that never
    reaches its target label is."""
    from training.attacks.library import build_attack
    from training.audit.attacks import Attack
    from training.audit.tables import _trial

    pgd = Attack(build_attack("pgd_linf", eps=E, steps=10), "pgd_linf", sees_shield=False)
    caught = {"defence": "Shield", "sr_at_5fpr": 0.0, "asr_label": 1.0, "attempted": 64}
    assert kinds([_trial(caught, pgd)]) == []
    missed = {**caught, "asr_label": 0.0}
    assert kinds([_trial(missed, pgd)]) == ["zero_at_max_eps"]
    wb = Attack(build_attack("wb", eps=E, steps=10, thresholds=torch.zeros(2)), "wb", sees_shield=True)
    assert kinds([_trial(caught, wb)]) == ["zero_at_max_eps"]  # an attack on the Shield that never gets past it
