"""Attack objectives: what the attacker minimises, and what counts as success against the deployed pipeline.

Sign conventions (`attacks-reference.md` §0.4): attacks are targeted and *minimise*; Shield logits are high = clean.
Every objective returns two per-example losses, `label` (reach the target class) and `detector` (be accepted by the
target class's Shield, None for attacks that ignore the detector); the engine combines them by summing (WB),
selecting (selective PGD) or orthogonalising (orthogonal PGD, Bryniarski et al. ICLR 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def cw_margin(logits: Tensor, target: Tensor, kappa: float) -> Tensor:
    """Carlini-Wagner targeted margin to minimise: max(max_{i != t} z_i - z_t, -kappa)."""
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    return torch.clamp(others.max(dim=1).values - z_t, min=-kappa)


def target_shield(shield_logits: Tensor, target: Tensor) -> Tensor:
    return shield_logits.gather(1, target[:, None]).squeeze(1)


@dataclass(frozen=True)
class Objective:
    """Base: targeted cross-entropy on the classifier (conventional PGD/BIM/FGSM); the Shield is ignored.

    `thresholds` (one Shield threshold per class) makes `success` the end-to-end criterion: the label reaches the
    target AND the target class's Shield accepts. Without thresholds, success is the label alone.
    """

    thresholds: Tensor | None = None

    def label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, reduction="none")

    def detector_loss(self, shield_logits: Tensor | None, target: Tensor) -> Tensor | None:
        return None

    def losses(self, logits: Tensor, shield_logits: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.label_loss(logits, target), self.detector_loss(shield_logits, target)

    def accepted(self, shield_logits: Tensor | None, target: Tensor) -> Tensor:
        if self.thresholds is None or shield_logits is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target_shield(shield_logits, target) >= self.thresholds.to(shield_logits.device)[target]

    def success(self, logits: Tensor, shield_logits: Tensor | None, target: Tensor) -> Tensor:
        return (logits.argmax(1) == target) & self.accepted(shield_logits, target)


@dataclass(frozen=True)
class CWObjective(Objective):
    """CW-L∞ style: the margin loss with confidence kappa on logits (Madry et al. / HFC code use large kappa)."""

    kappa: float = 100.0

    def label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return cw_margin(logits, target, self.kappa)


@dataclass(frozen=True)
class ShieldOnlyObjective(Objective):
    """The paper's literal J_shield = -S^t (§3): raise the target Shield's clean logit, no label term."""

    def label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return torch.zeros(logits.shape[0], device=logits.device)

    def detector_loss(self, shield_logits: Tensor | None, target: Tensor) -> Tensor:
        return -target_shield(shield_logits, target)


@dataclass(frozen=True)
class WhiteBoxObjective(CWObjective):
    """WB (paper §4.1 with the sign fixed, `attacks-reference.md` §2.3): J = -S^t(f(C(x))) + J_cw(x, t).

    With `margin` set, the detector term becomes a hinge max(tau_t + margin - S^t, 0) that stops pushing once the
    image is accepted with that margin (Tramèr et al. 2020: keep the loss consistent with success); it needs
    thresholds.
    """

    margin: float | None = None

    def detector_loss(self, shield_logits: Tensor | None, target: Tensor) -> Tensor:
        s = target_shield(shield_logits, target)
        if self.margin is None:
            return -s
        if self.thresholds is None:
            raise ValueError("a hinged WhiteBoxObjective needs thresholds")
        return torch.clamp(self.thresholds.to(s.device)[target] + self.margin - s, min=0.0)
