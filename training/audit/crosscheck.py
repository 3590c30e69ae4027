"""A cross-check on the whole defended pipeline with attack code this project did not write (torchattacks).

torchattacks (like ART) attacks a classifier, not a classifier + detector. The (N+1)-class wrapper of Carlini &
Wagner (AISec 2017, "Adversarial examples are not easily detected") turns the bundle's decision rule into one:

    G(x) = [Z_1, ..., Z_N, Z_rej],   Z_rej = max_j Z_j + (tau_k - S^k),   k = argmax_j Z_j

with Z the classifier's logits and S^k the Shield logit of the predicted class, all behind the Cushion (exact
forward, identity backward: `training.attacks.engine.CushionedModel`). Z_rej is above every class logit exactly when the
Shield rejects (accept iff S^k >= tau_k), so argmax G = t < N means "diagnosed t and accepted". A targeted attack on G
towards t is therefore an attack on the whole pipeline, computed by someone else's loop and loss. The library's
`wb_n1` runs the same objective on this project's engine. Its last iterate is rounded
to the nearest uint8 image inside the budget and judged by this project's `judge`, like every attack of the audit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.cushion import CushionBase
from training.attacks.engine import AttackResult, CushionedModel, into_budget, judge
from training.attacks.library import AttackSpec
from training.attacks.objectives import WhiteBoxObjective, reject_as_class


class RejectAsClass(nn.Module):
    """The (N+1)-class wrapper as a model: `reject_as_class` on the pipeline's outputs."""

    def __init__(self, net: nn.Module, cushion: CushionBase | None, thresholds: Tensor):
        super().__init__()
        self.pipeline = CushionedModel(net, cushion)
        self.register_buffer("thresholds", thresholds.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        logits, shield_logits, _ = self.pipeline(x)
        return reject_as_class(logits, shield_logits, self.thresholds)


def torchattacks_pgd(eps: float, steps: int, thresholds: Tensor) -> AttackSpec:
    """torchattacks' PGD (CE, random start, step 2.5 eps / steps, last iterate), targeted, on `RejectAsClass`."""

    def run(net, x, target, cushion: CushionBase | None = None) -> AttackResult:
        import torchattacks  # local import: an optional dependency (the dev extra)

        wrapper = RejectAsClass(net, cushion, thresholds).eval()
        attack = torchattacks.PGD(wrapper, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
        attack.set_mode_targeted_by_label(quiet=True)  # the labels given to the attack are its targets
        x_adv = into_budget(attack(x, target), x, eps)
        success, reached = judge(net, x_adv, target, WhiteBoxObjective(thresholds=thresholds), cushion)
        return AttackResult(x_adv, success, reached)

    return AttackSpec("torchattacks_pgd", f"torchattacks PGD ({steps} steps, CE) on the (N+1)-class wrapper of "
                      "classifier + Shield (Carlini & Wagner 2017), BPDA through the Cushion; external code",
                      run, eps, "linf", steps)
