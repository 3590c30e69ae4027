"""Detection statistics against hand-computed values and sklearn/training.metrics; bootstrap behaviour."""

import numpy as np
import pytest

from training import metrics
from training.audit.stats import (
    auroc,
    bootstrap_ci,
    detection_summary,
    success_at_fpr,
    tpr_at_tnr,
)


def test_tpr_at_90tnr_hand_example():
    clean = np.arange(10, dtype=float)  # at most 1 of 10 clean may be flagged: threshold just above 8
    adversarial = np.array([7.5, 8.0, 8.5, 20.0])
    assert tpr_at_tnr(clean, adversarial, 0.90) == pytest.approx(0.5)  # 8.5 and 20 detected; 8.0 ties with clean 8


def test_tpr_agrees_with_the_acceptance_metric_on_continuous_scores():
    rng = np.random.default_rng(0)
    clean, adversarial = rng.normal(size=300), rng.normal(1.0, 1.0, size=120)
    for tnr in (0.90, 0.95):
        assert tpr_at_tnr(clean, adversarial, tnr) == pytest.approx(metrics.tpr_at_tnr(clean, adversarial, tnr)[0])
    assert auroc(clean, adversarial) == pytest.approx(metrics.auroc(clean, adversarial))


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
