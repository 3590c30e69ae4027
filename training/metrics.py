"""Detection metrics (scikit-learn backed) and Shield threshold calibration.

Orientation (`attacks-reference.md` §5.1): positive = adversarial, score = -(Shield logit of the routed class), so a
higher score means more adversarial. Thresholds are fixed on clean validation data, never on test data.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> float:
    """P(score_adv > score_clean), ties counting 1/2; NaN when either set is empty."""
    if len(clean_scores) == 0 or len(adversarial_scores) == 0:
        return float("nan")
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(adversarial_scores))]
    return float(roc_auc_score(labels, np.r_[clean_scores, adversarial_scores]))


def tpr_at_tnr(clean_scores: np.ndarray, adversarial_scores: np.ndarray, tnr: float = 0.90) -> tuple[float, float]:
    """TPR at a threshold set on the clean scores so that at most floor((1 - tnr) n) clean scores exceed it.

    Returns (TPR, realised TNR); strict `>` so that saturated or tied scores never inflate the TPR.
    """
    if len(clean_scores) == 0 or len(adversarial_scores) == 0:
        return float("nan"), float("nan")
    clean = np.sort(np.asarray(clean_scores, dtype=np.float64))
    tau = clean[int(np.ceil(tnr * len(clean))) - 1]
    return float(np.mean(np.asarray(adversarial_scores) > tau)), float(np.mean(clean <= tau))


def shield_threshold(clean_logits: np.ndarray, rejection_rate: float) -> float:
    """The Shield-logit threshold (accept iff logit >= threshold) rejecting at most `rejection_rate` of clean inputs."""
    if len(clean_logits) == 0:
        raise ValueError("cannot calibrate a Shield threshold on zero clean images")
    ordered = np.sort(np.asarray(clean_logits, dtype=np.float64))
    return float(ordered[int(np.floor(rejection_rate * len(ordered)))])
