"""One PGD-family engine for every gradient attack: FGSM, BIM, PGD (L∞ / L2), MIM, WB / WB_d, selective and
orthogonal PGD are configurations of `PGDConfig` plus an `Objective`.

Conventions (`attacks-reference.md` §0): images in [0, 1]; targeted, minimising; the iterate stays continuous
(rounding each step would erase small steps), the Cushion's exact forward pass does its own uint8 rounding, and the
returned adversarial images are quantised to uint8 levels once, at the end. The best iterate per example is kept
(successful first, then reached-the-label, then lowest loss), not the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from models.cushion import NoCushion
from training.attacks.bpda import Surrogate, through_cushion
from training.attacks.objectives import Objective

Direction = Literal["sum", "selective", "orthogonal"]


@dataclass(frozen=True)
class PGDConfig:
    """Hyper-parameters of one gradient attack.

    Args:
        eps: budget in [0, 1] pixel units (the paper writes k/256).
        steps: iterations.
        step_size: per-step size; default 2.5 * eps / steps (Madry et al.).
        norm: "linf" (sign steps, box projection) or "l2" (normalised steps, ball projection).
        random_start: uniform start in the ball (symmetric, unlike the HFC code's one-sided start).
        restarts: independent runs; the best result per example is kept.
        decay_steps: iterations at which the step size is multiplied by `decay_factor` (WB_d: one drop at 50).
        momentum: MI-FGSM decay mu on the L1-normalised gradient; 0 disables.
        direction: how the label and detector gradients combine: "sum" (WB), "selective" (label until reached,
            then detector only) or "orthogonal" (each step orthogonal to the other objective's gradient).
    """

    eps: float
    steps: int
    step_size: float | None = None
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True
    restarts: int = 1
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    momentum: float = 0.0
    direction: Direction = "sum"

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


@dataclass
class AttackResult:
    x_adv: Tensor  # quantised to multiples of 1/255, inside the eps-ball
    success: Tensor  # bool per example, judged on x_adv through the exact Cushion
    label_reached: Tensor
    losses: list[float] = field(default_factory=list)  # mean total loss per step (first restart), for sanity checks


class Pipeline(nn.Module):
    """The attacked pipeline: exact Cushion forward (BPDA backward) then a model returning logits [, shield logits]."""

    def __init__(self, model: nn.Module, cushion=None, surrogate: Surrogate | None = None):
        super().__init__()
        self.model, self.cushion, self.surrogate = model, cushion or NoCushion(), surrogate

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.model(through_cushion(x, self.cushion, self.surrogate))
        return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def quantise(x: Tensor) -> Tensor:
    return torch.floor(x.clamp(0, 1) * 255 + 0.5) / 255


def _per_example_norm(g: Tensor, p: float) -> Tensor:
    return g.flatten(1).norm(p=p, dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def _linf_box(x0: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Bounds for the continuous iterate such that its uint8 rounding stays inside [x0 - eps, x0 + eps].

    Only the uint8 levels inside the ball are reachable; the iterate may sit up to half a level beyond them, which
    rounding removes, so the judged and returned images never exceed eps.
    """
    low = torch.ceil((x0 - eps) * 255 - 1e-4).clamp_min(0)
    high = torch.floor((x0 + eps) * 255 + 1e-4).clamp_max(255)
    return (low - 0.499) / 255, (high + 0.499) / 255


def _project(x: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        low, high = _linf_box(x0, eps)
        x = torch.min(torch.max(x, low), high)
    else:
        delta = x - x0
        delta = delta * torch.clamp(eps / _per_example_norm(delta, 2), max=1.0)
        x = x0 + delta
    return x.clamp(0, 1)


def _random_start(x0: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0, 1)
    direction = torch.randn_like(x0)
    radius = eps * torch.rand(x0.shape[0], *([1] * (x0.dim() - 1)), device=x0.device)
    return (x0 + direction / _per_example_norm(direction, 2) * radius).clamp(0, 1)


def _orthogonal(u: Tensor, v: Tensor) -> Tensor:
    """u minus its projection on v, per example."""
    uf, vf = u.flatten(1), v.flatten(1)
    coef = (uf * vf).sum(1) / (vf * vf).sum(1).clamp_min(1e-20)
    return (uf - coef[:, None] * vf).view_as(u)


def _rank(success: Tensor, reached: Tensor, loss: Tensor) -> Tensor:
    """Higher is better for the attacker; loss differences never outweigh success or reaching the label."""
    return success.float() * 1e9 + reached.float() * 1e6 - loss.clamp(-1e5, 1e5)


def _gradient(pipeline: Pipeline, x: Tensor, target: Tensor, objective: Objective, direction: Direction):
    x = x.detach().requires_grad_(True)
    logits, shield_logits = pipeline(x)
    label_loss, detector_loss = objective.losses(logits, shield_logits, target)
    total = label_loss if detector_loss is None else label_loss + detector_loss
    reached = logits.argmax(1) == target
    success = objective.success(logits, shield_logits, target)
    if detector_loss is None or direction == "sum":
        (grad,) = torch.autograd.grad(total.sum(), x)
    else:
        g_label, g_det = torch.autograd.grad(label_loss.sum(), x, retain_graph=True)[0], \
            torch.autograd.grad(detector_loss.sum(), x)[0]
        if direction == "orthogonal":
            g_label, g_det = _orthogonal(g_label, g_det), _orthogonal(g_det, g_label)
        grad = torch.where(reached.view(-1, *([1] * (x.dim() - 1))), g_det, g_label)
    return grad, total.detach(), reached, success


def pgd(model: nn.Module | Pipeline, x: Tensor, target: Tensor, objective: Objective, config: PGDConfig,
        cushion=None, surrogate: Surrogate | None = None) -> AttackResult:
    """Run the configured attack on a batch `x` (N x C x H x W in [0, 1]) towards `target` (N,)."""
    pipeline = model if isinstance(model, Pipeline) else Pipeline(model, cushion, surrogate)
    modes = {module: module.training for module in pipeline.modules()}
    pipeline.eval()
    x0 = x.detach()
    best_x, best_rank = x0.clone(), torch.full((x0.shape[0],), -float("inf"), device=x0.device)
    best_success = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    best_reached = best_success.clone()
    curve: list[float] = []
    try:
        for restart in range(config.restarts):
            xk = (_project(_random_start(x0, config.eps, config.norm), x0, config.eps, config.norm)
                  if config.random_start else x0.clone())
            alpha, momentum = config.alpha, torch.zeros_like(x0)
            for step in range(config.steps + 1):  # the last pass only judges the final iterate
                if step in config.decay_steps:
                    alpha *= config.decay_factor
                grad, loss, reached, success = _gradient(pipeline, xk, target, objective, config.direction)
                rank = _rank(success, reached, loss)
                better = rank > best_rank
                best_x[better], best_rank[better] = xk[better], rank[better]
                best_success[better], best_reached[better] = success[better], reached[better]
                if restart == 0:
                    curve.append(float(loss.mean()))
                if step == config.steps:
                    break
                if config.momentum:
                    momentum = config.momentum * momentum + grad / _per_example_norm(grad, 1)
                    grad = momentum
                if config.norm == "linf":
                    xk = xk - alpha * grad.sign()
                else:
                    xk = xk - alpha * grad / _per_example_norm(grad, 2)
                xk = _project(xk, x0, config.eps, config.norm).detach()
    finally:
        for module, mode in modes.items():  # restore each submodule's own mode (a frozen classifier stays in eval)
            module.train(mode)
    # best_x was judged through the exact Cushion, which rounds to uint8 first, so quantising changes no verdict.
    return AttackResult(quantise(best_x), best_success, best_reached, curve)
