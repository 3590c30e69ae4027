import numpy as np
import pytest

from training.metrics import auroc, shield_threshold, tpr_at_tnr


def test_auroc_hand_example_with_ties():
    # pairs (adv > clean): 3>1, 3>2, 2=2 (1/2), 2>1 -> 3.5 of 4
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 2.0])) == pytest.approx(3.5 / 4)


def test_auroc_orientation_is_fixed_not_flipped():
    assert auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 0.0  # a failing detector stays failing


def test_tpr_at_tnr_hand_example():
    clean = np.arange(10, dtype=float)  # tau = 9th smallest = 8: one clean score (9) above it
    adversarial = np.array([7.5, 8.0, 8.5, 20.0])
    tpr, tnr = tpr_at_tnr(clean, adversarial, 0.90)
    assert tpr == pytest.approx(0.5)  # strict >: 8.0 ties with tau and is not counted
    assert tnr == pytest.approx(0.9)


def test_tpr_at_tnr_never_exceeds_the_false_positive_budget_with_saturated_scores():
    clean = np.ones(20)
    tpr, tnr = tpr_at_tnr(clean, np.ones(5), 0.90)
    assert tpr == 0.0 and tnr == 1.0


def test_shield_threshold_rejects_at_most_the_rate():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000)
    tau = shield_threshold(logits, 0.05)
    assert np.mean(logits < tau) == pytest.approx(0.05, abs=0.001)
    assert np.mean(logits < tau) <= 0.05


def test_empty_inputs():
    assert np.isnan(auroc(np.array([]), np.array([1.0])))
    with pytest.raises(ValueError):
        shield_threshold(np.array([]), 0.05)
