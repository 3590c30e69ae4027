"""Detection metrics and Shield threshold calibration: one home for the training, evaluation and audit figures, all
read off scikit-learn's ROC curve, with percentile bootstrap intervals.

Orientation (`attacks-reference.md` §5.1): positive = adversarial; a score is higher when more adversarial
(`routed_scores`: the routed class's threshold minus its Shield logit); the orientation comes from each detector's
definition and is never flipped on test data (an AUROC far below 0.5 is a failing detector, not an inverted one).
Thresholds are fixed on clean validation data, never on test data.

- AUROC: `roc_auc_score` (= P(s_adv > s_clean), ties 1/2).
- TPR at a TNR: the largest TPR on `roc_curve` whose FPR stays within 1 - TNR (roc_curve counts s >= threshold
  as detected, so a tie with a clean score is charged to the false-positive budget, never to the detector's credit).
- SR@5% (Bryniarski et al., ICLR 2022): with the detection threshold at 5% FPR on clean scores, the share of
  *attempted* attacks that reach their target label and are not detected; = ASR_label x (1 - TPR@95%TNR).
- Bootstrap: scipy's percentile bootstrap, clean and adversarial sets resampled independently, fixed seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score, roc_curve

log = logging.getLogger("aegis.metrics")


def _labelled(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clean, adversarial = np.asarray(clean, dtype=np.float64), np.asarray(adversarial, dtype=np.float64)
    return np.r_[np.zeros(len(clean)), np.ones(len(adversarial))], np.r_[clean, adversarial]


def roc(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with every threshold kept (no intermediate point dropped)."""
    y, s = _labelled(clean, adversarial)
    return roc_curve(y, s, drop_intermediate=False)


def auroc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """P(score_adv > score_clean), ties counting 1/2; NaN when either set is empty."""
    if len(clean) == 0 or len(adversarial) == 0:
        return float("nan")
    return float(roc_auc_score(*_labelled(clean, adversarial)))


def routed_scores(shield_logits: np.ndarray, classes: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Detection score (high = adversarial): threshold minus Shield logit of `classes` (predicted / target class).

    Relative to each class's threshold, so pooled AUROC / TPR compare like with like and a score > 0 is a rejection.
    """
    return thresholds[classes] - shield_logits[np.arange(len(classes)), classes]


def operating_point(clean: np.ndarray, adversarial: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, threshold) at the lowest threshold (detected iff score >= threshold) whose clean FPR is <= `fpr`."""
    fprs, tprs, thresholds = roc(clean, adversarial)
    i = np.flatnonzero(fprs <= fpr + 1e-12)[-1]  # roc_curve's thresholds decrease, so the last one is the lowest
    return float(tprs[i]), float(thresholds[i])


def tpr_at_tnr(clean: np.ndarray, adversarial: np.ndarray, tnr: float = 0.90) -> float:
    """TPR at the lowest detection threshold whose clean TNR is >= `tnr`; NaN when either set is empty."""
    if len(clean) == 0 or len(adversarial) == 0:
        return float("nan")
    return operating_point(clean, adversarial, 1 - tnr)[0]


def realised_tnr(clean: np.ndarray, adversarial: np.ndarray, tnr: float = 0.90) -> float:
    """The clean TNR that `tpr_at_tnr`'s threshold actually reaches (>= `tnr`; above it when clean scores tie)."""
    if len(clean) == 0 or len(adversarial) == 0:
        return float("nan")
    threshold = operating_point(clean, adversarial, 1 - tnr)[1]
    return float(np.mean(np.asarray(clean, dtype=np.float64) < threshold))


def success_at_fpr(clean: np.ndarray, attempted_scores: np.ndarray, reached: np.ndarray, fpr: float = 0.05) -> float:
    """Share of attempted attacks that reach the target AND stay below the detection threshold set at `fpr`."""
    reached = np.asarray(reached, dtype=bool)
    if len(clean) == 0 or len(reached) == 0:
        return float("nan")
    if not reached.any():
        return 0.0
    tpr, _ = operating_point(clean, np.asarray(attempted_scores)[reached], fpr)
    return float(reached.mean() * (1 - tpr))


def bootstrap_ci(statistic: Callable[..., float], *samples: np.ndarray, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*samples)`; each sample (indexed on axis 0) resampled on its own.

    Samples may be multi-column arrays (e.g. score and reached-the-target per attempted attack): rows stay together.
    """
    if any(len(s) < 2 for s in samples):  # no interval from fewer than two observations (scipy refuses them too)
        return float("nan"), float("nan")
    indices = tuple(np.arange(len(s)) for s in samples)
    result = bootstrap(indices, lambda *idx: statistic(*(s[i] for s, i in zip(samples, idx))),
                       n_resamples=n_resamples, confidence_level=level, method="percentile", vectorized=False,
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(low), float(high)


def detection_summary(clean: np.ndarray, attempted_scores: np.ndarray, reached: np.ndarray, n_resamples: int = 1000,
                      seed: int = 0) -> dict:
    """Every detection figure of one (detector, attack) cell, with 95% percentile bootstrap intervals.

    `clean`: scores of clean (correctly classified) images; `attempted_scores` / `reached`: score and label success
    of every attempted attack. AUROC and TPR use the attacks that reached their target (`attacks-reference.md` §5.5);
    SR@5% and ASR use all attempted ones, so a Cushion that makes attacks miss is credited there, not hidden.
    """
    clean = np.asarray(clean, dtype=np.float64)
    attempted_scores = np.asarray(attempted_scores, dtype=np.float64)
    reached = np.asarray(reached, dtype=bool)
    successful = attempted_scores[reached]
    attempts = np.c_[attempted_scores, reached]

    def sr5(c, a):
        return success_at_fpr(c, a[:, 0], a[:, 1].astype(bool), 0.05)

    out = {
        "n_clean": len(clean), "attempted": len(attempted_scores), "successful": int(reached.sum()),
        "asr_label": float(reached.mean()) if len(reached) else float("nan"),
        "auroc": auroc(clean, successful), "tpr_at_90tnr": tpr_at_tnr(clean, successful, 0.90),
        "tpr_at_95tnr": tpr_at_tnr(clean, successful, 0.95), "sr_at_5fpr": sr5(clean, attempts),
    }
    if n_resamples:
        ci = {"auroc": (auroc, clean, successful), "tpr_at_90tnr": (tpr_at_tnr, clean, successful),
              "sr_at_5fpr": (sr5, clean, attempts)}
        for key, (fn, *samples) in ci.items():
            out[f"{key}_ci95"] = list(bootstrap_ci(fn, *samples, n_resamples=n_resamples, seed=seed))
        out["bootstrap"] = {"method": "percentile", "resamples": n_resamples, "seed": seed}
    return out


def routed_clean_logits(logits: np.ndarray, shield_logits: np.ndarray, labels: np.ndarray,
                        classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per class, the Shield logits of the clean images routed (by prediction) to its Shield: what its threshold is
    calibrated on. A class that no image is predicted as falls back to the images labelled with it."""
    pred = np.asarray(logits).argmax(1)
    labels = np.asarray(labels)
    routed = {}
    for k, name in enumerate(classes):
        chosen = pred == k
        if not chosen.any():
            log.warning("no clean image is predicted as %s; using the %s-labelled ones for its Shield", name, name)
            chosen = labels == k
        routed[name] = np.asarray(shield_logits)[chosen, k]
    return routed


def shield_threshold(clean_logits: np.ndarray, rejection_rate: float) -> float:
    """The Shield-logit threshold (accept iff logit >= threshold) rejecting at most `rejection_rate` of clean inputs."""
    if len(clean_logits) == 0:
        raise ValueError("cannot calibrate a Shield threshold on zero clean images")
    ordered = np.sort(np.asarray(clean_logits, dtype=np.float64))
    return float(ordered[int(np.floor(rejection_rate * len(ordered)))])
