"""The robustness ceiling of a bundle's classifier (Tramèr, ICML 2022: a detector robust at ε yields a classifier
robust at ε/2, so detection can be no better than the robustness of the classifier under the Shields allows).

Measured as the robust accuracy of Cushion + classifier under APGD-CE (Croce & Hein 2020; targeted at the other
class, which for a binary task is the untargeted attack) at several budgets. An image counts as robust at ε only if
neither of two gradients through the Cushion reaches the target, at this budget or a smaller one: BPDA identity and
a differentiable JPEG (the stronger one varies by model, and a ceiling must not be raised by gradient masking).

    python -m training.audit ceiling --bundle models/default --set eval_images=128 --set adaptive_steps=100

A run trained without Shields (`--set shield_epochs=0 --skip-eval`) still writes `<run>/bundle`: pass that to compare
classifiers before training any Shield.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor, nn

from models.cushion import CushionBase
from training.attacks.library import build_attack
from training.audit.attacks import targets_for
from training.audit.harness import correct_subset
from training.inference import predict
from training.metrics import bootstrap_ci

log = logging.getLogger("aegis.audit")
CEILING_BUDGETS = (4 / 256, 8 / 256, 16 / 256)
BACKWARDS = ("identity", "diffjpeg")


def robust_accuracy(classifier: nn.Module, x: Tensor, y: np.ndarray, cushion: CushionBase, n_images: int, steps: int,
                    budgets: tuple[float, ...] = CEILING_BUDGETS, batch: int = 50, seed: int = 0,
                    n_resamples: int = 1000) -> dict:
    """Clean accuracy (with the Cushion) on `x` and, per budget, the share of `n_images` correctly classified images
    that APGD-CE cannot flip at that budget or a smaller one (`robust_of_correct`, bootstrap interval) and the usual robust accuracy over all images
    (`robust_accuracy` = clean accuracy x robust_of_correct)."""
    pred = predict(classifier, x, cushion)[0].argmax(1)
    clean_accuracy = float((pred == y).mean())
    index = correct_subset(pred, y, n_images, seed)
    xs = x[index]
    targets = targets_for(torch.from_numpy(y[index]), classifier.head[-1].out_features, seed)
    rows = []
    backwards = BACKWARDS if getattr(cushion, "quality", None) is not None else ("identity",)
    # an attacker with budget eps may also run every smaller budget's attack: an image is robust at eps only if no
    # attack at eps or below flipped it (so the ceiling never rises with the budget, whatever APGD's step sizes do)
    flipped = np.zeros(len(index), dtype=bool)
    for eps in sorted(budgets):
        per_backward = {}
        for backward in backwards:
            spec = build_attack("apgd_ce", eps=eps, steps=steps, backward=backward)
            torch.manual_seed(seed)
            reached = torch.cat([spec(classifier, xs[i:i + batch], targets[i:i + batch], cushion).label_reached
                                 for i in range(0, len(index), batch)]).numpy().astype(bool)
            per_backward[backward] = float((~reached).mean()) if len(reached) else float("nan")
            flipped |= reached
        robust = ~flipped
        share = float(robust.mean()) if len(robust) else float("nan")
        low, high = bootstrap_ci(np.mean, robust.astype(float), n_resamples=n_resamples, seed=seed)
        rows.append({"eps": eps, "eps_256": eps * 256, "attempted": len(index), "robust_of_correct": share,
                     "robust_of_correct_ci95": [low, high], "robust_accuracy": clean_accuracy * share,
                     "robust_of_correct_by_backward": per_backward})
        log.info("ceiling at %g/256: %.3f of %d correctly classified images resist APGD-CE-%d (%s)", eps * 256, share,
                 len(index), steps, per_backward)
    return {"attack": f"APGD-CE, {steps} steps, targeted at the other class, min over BPDA {' and '.join(backwards)} "
                      "and over this and every smaller budget",
            "cushion": cushion.describe(), "clean_accuracy": clean_accuracy, "clean_images": len(y), "rows": rows}


def ceiling_markdown(ceiling: dict) -> str:
    cushion = f"Cushion {ceiling['cushion']}; " if "cushion" in ceiling else ""
    lines = [f"Robust accuracy of Cushion + classifier ({cushion}{ceiling['attack']}; clean accuracy "
             f"{ceiling['clean_accuracy']:.3f} on {ceiling['clean_images']} {ceiling.get('split', 'test')} images):", "",
             "| ε (/256) | attacked | resist (of correct) | 95% CI | robust accuracy |", "|---|---|---|---|---|"]
    for r in ceiling["rows"]:
        low, high = r["robust_of_correct_ci95"]
        lines.append(f"| {r['eps_256']:g} | {r['attempted']} | {r['robust_of_correct']:.3f} | {low:.3f}–{high:.3f} | "
                     f"{r['robust_accuracy']:.3f} |")
    return "\n".join(lines)
