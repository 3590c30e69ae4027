import numpy as np
import pytest

from training.metrics import (
    auroc,
    bootstrap_ci,
    detection_summary,
    realised_tnr,
    shield_threshold,
    success_at_fpr,
    tpr_at_tnr,
)


def test_auroc_hand_example_with_ties():
    # pairs (adv > clean): 3>1, 3>2, 2=2 (1/2), 2>1 -> 3.5 of 4
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 2.0])) == pytest.approx(3.5 / 4)


def test_auroc_orientation_is_fixed_not_flipped():
    assert auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 0.0  # a failing detector stays failing


def test_tpr_at_tnr_hand_example():
    clean = np.arange(10, dtype=float)  # tau = 9th smallest = 8: one clean score (9) above it
    adversarial = np.array([7.5, 8.0, 8.5, 20.0])
    assert tpr_at_tnr(clean, adversarial, 0.90) == pytest.approx(0.5)  # 8.0 ties with tau and is not counted
    assert realised_tnr(clean, adversarial, 0.90) == pytest.approx(0.9)


def test_tpr_at_tnr_never_exceeds_the_false_positive_budget_with_saturated_scores():
    clean = np.ones(20)
    assert tpr_at_tnr(clean, np.ones(5), 0.90) == 0.0 and realised_tnr(clean, np.ones(5), 0.90) == 1.0


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


def _reference_tpr(clean, adversarial, tnr):
    """Detection threshold = the ceil(tnr n)-th smallest clean score, detected iff strictly above it."""
    tau = np.sort(clean)[int(np.ceil(tnr * len(clean))) - 1]
    return float(np.mean(adversarial > tau))


def _reference_auroc(clean, adversarial):
    """P(adv > clean) + P(tie) / 2 over every pair (Mann-Whitney)."""
    diff = adversarial[:, None] - clean[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def test_tpr_and_auroc_agree_with_pairwise_references_on_continuous_scores():
    rng = np.random.default_rng(0)
    clean, adversarial = rng.normal(size=300), rng.normal(1.0, 1.0, size=120)
    for tnr in (0.90, 0.95):
        assert tpr_at_tnr(clean, adversarial, tnr) == pytest.approx(_reference_tpr(clean, adversarial, tnr))
    assert auroc(clean, adversarial) == pytest.approx(_reference_auroc(clean, adversarial))


def test_sr_at_5fpr_hand_example():
    clean = np.arange(20, dtype=float)  # 5% of 20 = 1 clean may be flagged (19): detected iff score > 18
    scores = np.array([30.0, 19.0, 18.5, 18.0, 5.0, 100.0, 0.0])
    reached = np.array([True, True, True, True, True, False, False])
    # reached and undetected: 18.0 (a tie with clean 18 would cost a second false positive) and 5.0 -> 2 of 7
    assert success_at_fpr(clean, scores, reached, 0.05) == pytest.approx(2 / 7)
    assert success_at_fpr(clean, scores, np.zeros(7, bool), 0.05) == 0.0


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def width_and_check(n):
        clean, adversarial = rng.normal(size=n), rng.normal(1.0, 1.0, size=n)
        low, high = bootstrap_ci(auroc, clean, adversarial, n_resamples=400, seed=0)
        assert low <= auroc(clean, adversarial) <= high
        return high - low

    small, large = width_and_check(30), width_and_check(600)
    assert large < small / 2  # ~1/sqrt(n): 20x the data, ~4.5x narrower


def test_bootstrap_is_reproducible_with_its_seed():
    rng = np.random.default_rng(2)
    clean, adversarial = rng.normal(size=50), rng.normal(1.0, 1.0, size=50)
    assert bootstrap_ci(auroc, clean, adversarial, n_resamples=100, seed=3) == \
        bootstrap_ci(auroc, clean, adversarial, n_resamples=100, seed=3)


def test_summary_filters_auroc_to_successful_attacks_but_sr_counts_all_attempted():
    clean = np.zeros(40) + np.linspace(0, 1, 40)
    scores = np.r_[np.full(5, 10.0), np.full(5, -10.0)]  # 5 detected attacks reached, 5 undetected did not
    reached = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    out = detection_summary(clean, scores, reached, n_resamples=50)
    assert out["auroc"] == 1.0 and out["asr_label"] == 0.5 and out["sr_at_5fpr"] == 0.0
    assert out["auroc_ci95"][0] <= 1.0 <= out["auroc_ci95"][1]
