"""Attack objectives: what the attacker minimises, and what counts as success against the deployed pipeline.

Sign conventions (`attacks-reference.md` §0.4): attacks are targeted and *minimise*; Shield logits are high = clean.
Every objective returns two per-example losses, `label` (reach the target class) and `detector` (be accepted by the
target class's Shield, None for attacks that ignore the detector); the engine combines them by summing (WB),
selecting (selective PGD) or orthogonalising (orthogonal PGD, Bryniarski et al. ICLR 2022).
Feature-space objectives (Fea, HFC) name the classifier `layers` whose outputs they need; the engine passes those
features (computed on the Cushioned image, in the same forward pass) to `losses`.
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


def reject_as_class(logits: Tensor, shield_logits: Tensor, thresholds: Tensor) -> Tensor:
    """The (N+1)-class view of the defended decision (Carlini & Wagner, AISec 2017): the N class logits, then a
    'rejected' logit max_j z_j + (tau_k - S^k) for the predicted class k. It tops every class logit exactly when the
    Shield of k rejects (accept iff S^k >= tau_k), so argmax = t < N means "diagnosed t and accepted"."""
    k = logits.argmax(1, keepdim=True)
    margin = thresholds.to(shield_logits.device)[k] - shield_logits.gather(1, k)
    return torch.cat([logits, logits.max(1, keepdim=True).values + margin], 1)


@dataclass(frozen=True)
class Objective:
    """Base: targeted cross-entropy on the classifier (conventional PGD/BIM/FGSM); the Shield is ignored.

    `thresholds` (one Shield threshold per class) makes `success` the end-to-end criterion: the label reaches the
    target AND the target class's Shield accepts. Without thresholds, success is the label alone.
    """

    thresholds: Tensor | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """1-indexed classifier layers whose features `losses` needs (none for logit / Shield objectives)."""
        return ()

    def label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, reduction="none")

    def detector_loss(self, shield_logits: Tensor | None, target: Tensor) -> Tensor | None:
        return None

    def losses(self, logits: Tensor, shield_logits: Tensor | None, target: Tensor,
               features: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
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
class RejectClassObjective(Objective):
    """Targeted CE on `reject_as_class`: one loss for "reach t and be accepted", balanced by the softmax instead of
    WB's sum of a margin and an unbounded -S^t. On a small test model an outside PGD on this form beat our WB at the
    same budget and steps (tests/training/audit/test_crosscheck.py), so the library carries it too."""

    def losses(self, logits, shield_logits, target, features=None):
        if self.thresholds is None or shield_logits is None:
            raise ValueError("the (N+1)-class objective needs Shield logits and thresholds")
        return F.cross_entropy(reject_as_class(logits, shield_logits, self.thresholds), target, reduction="none"), None


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


@dataclass(frozen=True)
class DivergenceObjective(Objective):
    """TRADES's inner maximisation (Zhang et al., ICML 2019): move the prediction away from the clean one, i.e.
    minimise -KL(p_clean || p(x')). `clean_probs` holds the clean softmax of the attacked batch; with the target
    set to the most likely wrong class, the engine keeps a flipped iterate first, then the most divergent one."""

    clean_probs: Tensor | None = None

    def label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return -F.kl_div(F.log_softmax(logits, 1), self.clean_probs, reduction="none").sum(1)


@dataclass(frozen=True)
class FeatureObjective(CWObjective):
    """Fea (Sabour et al., ICLR 2016; `attacks-reference.md` §2.1): match the features of a guide image of the
    target class at `feature_layers` (the Shield taps by default), so that the Shield sees a natural image.

    detector = sum over layers of mean((f_l(C(x)) - f_l(C(x_guide)))^2) (per-layer mean: otherwise the largest
    layer dominates); label = `label_weight` * J_cw (0: Sabour's pure feature matching).
    `guides` holds, per layer, the guide features aligned with the attacked batch (one guide per image).
    """

    feature_layers: tuple[int, ...] = ()
    guides: tuple[Tensor, ...] = ()
    label_weight: float = 0.0

    @property
    def layers(self) -> tuple[int, ...]:
        return self.feature_layers

    def losses(self, logits, shield_logits, target, features=None):
        distance = sum(((f - g) ** 2).flatten(1).mean(1) for f, g in zip(features, self.guides))
        return self.label_weight * cw_margin(logits, target, self.kappa), distance


@dataclass(frozen=True)
class GaussianMixture:
    """One class's Gaussian mixture over one layer's globally average-pooled features (sklearn's parameters)."""

    means: Tensor  # K x C
    precision_cholesky: Tensor  # K x C x C, precision = L L^T
    log_weights: Tensor  # K

    def whitened(self, g: Tensor) -> Tensor:
        """(g - mu_k*) L_k* for each row of g, with k* the most likely component (chosen without gradient)."""
        with torch.no_grad():
            residual = torch.einsum("nkc,kcd->nkd", g[:, None] - self.means, self.precision_cholesky)
            log_det = torch.diagonal(self.precision_cholesky, dim1=1, dim2=2).log().sum(1)
            best = (-0.5 * residual.pow(2).sum(2) + log_det + self.log_weights).argmax(1)
        return torch.einsum("nc,ncd->nd", g - self.means[best], self.precision_cholesky[best])


@dataclass(frozen=True)
class HFCObjective(CWObjective):
    """Hierarchical Feature Constraint (Yao et al., MICCAI 2021; `attacks-reference.md` §2.2), as in the official
    `HFC_Attack.py`: J = J_cls + lambda * sum_l mean_c(((g_l(x) - mu_{l,k*}) L_{l,k*})^2), with g_l the spatial mean
    of layer l and k* the target class's most likely mixture component. J_cls is CE (`use_cw` False) or the CW
    margin with kappa (100 in the HFC code). `mixtures[c]` holds class c's mixture per layer of `feature_layers`.
    """

    feature_layers: tuple[int, ...] = ()
    mixtures: tuple[tuple[GaussianMixture, ...], ...] = ()
    weight: float = 1.0
    use_cw: bool = False

    @property
    def layers(self) -> tuple[int, ...]:
        return self.feature_layers

    def label_loss(self, logits, target):
        return cw_margin(logits, target, self.kappa) if self.use_cw else F.cross_entropy(logits, target,
                                                                                          reduction="none")

    def losses(self, logits, shield_logits, target, features=None):
        constraint = torch.zeros(len(target), device=logits.device)
        for layer, f in enumerate(features):
            pooled = f.flatten(2).mean(2)
            for c in target.unique().tolist():
                rows = target == c
                whitened = self.mixtures[c][layer].whitened(pooled[rows])
                constraint = constraint.index_add(0, rows.nonzero().squeeze(1), whitened.pow(2).mean(1))
        return self.label_loss(logits, target), self.weight * constraint
