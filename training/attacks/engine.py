"""One PGD-family engine for every gradient attack: FGSM, BIM, PGD (L∞ / L2), MIM, DIM, TIM, CW-L∞, APGD, EOT,
WB / WB_d, selective and orthogonal PGD, Fea and HFC are configurations of `PGDConfig` plus an `Objective`
(`training.attacks.library` names them).

Conventions (`attacks-reference.md` §0): images in [0, 1]; targeted, minimising; the iterate stays continuous
(rounding each step would erase small steps), the Cushion's exact forward pass does its own uint8 rounding, and the
returned adversarial images are quantised to uint8 levels once, at the end. The best iterate per example is kept
(successful first, then reached-the-label, then lowest loss), not the last one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.cushion import CushionBase, NoCushion
from training.attacks.bpda import Surrogate, through_cushion
from training.attacks.objectives import Objective
from training.options import Direction, Norm, Optimiser, check_literals

Transform = Callable[[Tensor], Tensor]


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
        optimiser: "pgd" (fixed step, optional decay and momentum) or "apgd" (Croce & Hein 2020: step 2 eps halved
            at checkpoints, momentum 0.75, restart from the best iterate; ignores step_size, decay and momentum).
        transform: random differentiable input transform used for the gradient only (DIM, EOT translations); the
            verdict is always taken on the untransformed image.
        gradient_filter: applied to the gradient before the step (TIM's Gaussian smoothing).
        eot_samples: gradients averaged per step over this many draws of the transform / stochastic surrogate.
    """

    eps: float
    steps: int
    step_size: float | None = None
    norm: Norm = "linf"
    random_start: bool = True
    restarts: int = 1
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    momentum: float = 0.0
    direction: Direction = "sum"
    optimiser: Optimiser = "pgd"
    transform: Transform | None = None
    gradient_filter: Transform | None = None
    eot_samples: int = 1

    def __post_init__(self):
        check_literals(self)
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or self.eot_samples < 1:
            raise ValueError(f"steps, restarts and eot_samples must be >= 1, got {self.steps}, {self.restarts}, "
                             f"{self.eot_samples}")
        if self.optimiser == "apgd" and (self.step_size is not None or self.decay_steps or self.momentum):
            raise ValueError("APGD sets its own step size and momentum; leave step_size, decay_steps, momentum unset")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


@dataclass
class AttackResult:
    x_adv: Tensor  # quantised to multiples of 1/255, inside the eps-ball
    success: Tensor  # bool per example, judged on x_adv through the exact Cushion
    label_reached: Tensor
    losses: list[float] = field(default_factory=list)  # mean total loss per step (first restart), for sanity checks


class CushionedModel(nn.Module):
    """The attacked pipeline: exact Cushion forward (BPDA backward) then a model returning logits [, shield logits].

    `forward(x, layers)` returns (logits, shield logits or None, features at the 1-indexed classifier `layers`), all
    from one pass; the model is an `AegisNet`, a `TappedClassifier` or (without layers) any logits model.
    """

    def __init__(self, model: nn.Module, cushion: CushionBase | None = None, surrogate: Surrogate | None = None):
        super().__init__()
        self.model, self.cushion, self.surrogate = model, cushion or NoCushion(), surrogate

    def forward(self, x: Tensor, layers: tuple[int, ...] = ()) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        x = through_cushion(x, self.cushion, self.surrogate)
        if not layers:
            out = self.model(x)
            return (out[0], out[1], []) if isinstance(out, tuple) else (out, None, [])
        shielded = hasattr(self.model, "shields")
        classifier = self.model.classifier if shielded else self.model
        taps = tuple(classifier.taps) if shielded else ()
        logits, features = classifier.forward_layers(x, taps + tuple(layers))
        shield_logits = self.model.shield_logits(features[:len(taps)], logits) if shielded else None
        return logits, shield_logits, features[len(taps):]


@torch.no_grad()
def judge(model: nn.Module | CushionedModel, x: Tensor, target: Tensor, objective: Objective,
          cushion: CushionBase | None = None) -> tuple[Tensor, Tensor]:
    """(success, label reached) of `x` through the exact Cushion: the verdict every attack reports."""
    pipeline = model if isinstance(model, CushionedModel) else CushionedModel(model, cushion)
    logits, shield_logits, _ = pipeline(x)
    return objective.success(logits, shield_logits, target), logits.argmax(1) == target


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


def _onto_l2_grid(x: Tensor, x0: Tensor, eps: float, iterations: int = 20) -> Tensor:
    """Shrink x - x0 (bisection on its scale) until the uint8 rounding of x lies inside the L2 ball.

    Rounding can lengthen a perturbation by up to half a level per pixel, which at the paper's L2 budget is more
    than the whole budget; as for L∞, the reachable set is the uint8 images inside the ball, so the iterate is kept
    where its rounding stays there. The rounded norm only grows with the scale, so bisection finds the largest.
    """
    def rounded_norm(scale: Tensor) -> Tensor:
        return (quantise(x0 + scale * delta) - x0).flatten(1).norm(dim=1)

    delta = x - x0
    shape = (-1, *([1] * (x.dim() - 1)))
    low, high = torch.zeros(x.shape[0], device=x.device), torch.ones(x.shape[0], device=x.device)
    fits = rounded_norm(high.view(shape)) <= eps
    if fits.all():
        return x
    for _ in range(iterations):
        middle = (low + high) / 2
        ok = rounded_norm(middle.view(shape)) <= eps
        low, high = torch.where(ok, middle, low), torch.where(ok, high, middle)
    scale = torch.where(fits, torch.ones_like(low), low)
    return x0 + scale.view(shape) * delta


def _project(x: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        low, high = _linf_box(x0, eps)
        return torch.min(torch.max(x, low), high).clamp(0, 1)
    delta = x - x0
    delta = delta * torch.clamp(eps / _per_example_norm(delta, 2), max=1.0)
    return _onto_l2_grid((x0 + delta).clamp(0, 1), x0, eps)


def into_budget(x: Tensor, x0: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """The uint8 image nearest `x` whose perturbation of `x0` stays inside the budget: for images made by code outside
    the engine (its projection is continuous, and rounding alone can step past eps by half a level)."""
    return quantise(_project(x, x0, eps, norm))


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
    """Higher is better for the attacker; loss differences never outweigh success or reaching the label.

    In float64: in float32 the spacing near 1e9 is 64, which would hide every loss difference between two
    successful iterates (and so the more strongly accepted one)."""
    return success.double() * 1e9 + reached.double() * 1e6 - loss.double().clamp(-1e5, 1e5)


def _losses(pipeline: CushionedModel, x: Tensor, target: Tensor, objective: Objective):
    logits, shield_logits, features = pipeline(x, objective.layers)
    label_loss, detector_loss = objective.losses(logits, shield_logits, target, features)
    return logits, shield_logits, label_loss, detector_loss


def _gradient(pipeline: CushionedModel, x: Tensor, target: Tensor, objective: Objective, config: PGDConfig):
    """The step direction at x (before sign / normalisation) and the verdict on x itself.

    Label and detector gradients are averaged over `eot_samples` draws (of the transform and of a stochastic
    surrogate) before they are combined, so selective / orthogonal PGD work on the expected gradients.
    """
    x = x.detach().requires_grad_(True)
    verdict = None
    g_label, g_detector = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(config.eot_samples):
        seen = config.transform(x) if config.transform is not None else x
        logits, shield_logits, label_loss, detector_loss = _losses(pipeline, seen, target, objective)
        if config.transform is None and verdict is None:  # the straight-through value is the exact pipeline's
            verdict = (logits.detach(), None if shield_logits is None else shield_logits.detach(),
                       label_loss.detach(), None if detector_loss is None else detector_loss.detach())
        if detector_loss is None or config.direction == "sum":
            total = label_loss if detector_loss is None else label_loss + detector_loss
            g_label += torch.autograd.grad(total.sum(), x)[0]
        else:
            g_label += torch.autograd.grad(label_loss.sum(), x, retain_graph=True)[0]
            g_detector += torch.autograd.grad(detector_loss.sum(), x)[0]
    if verdict is None:
        with torch.no_grad():
            verdict = _losses(pipeline, x, target, objective)
    logits, shield_logits, label_loss, detector_loss = verdict
    total = label_loss if detector_loss is None else label_loss + detector_loss
    reached = logits.argmax(1) == target
    success = objective.success(logits, shield_logits, target)
    if detector_loss is None or config.direction == "sum":
        grad = g_label
    else:
        if config.direction == "orthogonal":
            g_label, g_detector = _orthogonal(g_label, g_detector), _orthogonal(g_detector, g_label)
        grad = torch.where(reached.view(-1, *([1] * (x.dim() - 1))), g_detector, g_label)
    if config.gradient_filter is not None:
        grad = config.gradient_filter(grad)
    return grad / config.eot_samples, total, reached, success


def _descent(grad: Tensor, norm: str) -> Tensor:
    """The unit step direction that lowers the loss: sign for L∞, the normalised gradient for L2."""
    return -grad.sign() if norm == "linf" else -grad / _per_example_norm(grad, 2)


class _PGDStep:
    """Fixed step size (optionally decayed at given steps) with optional MI-FGSM momentum."""

    def __init__(self, config: PGDConfig, x0: Tensor):
        self.config, self.x0, self.alpha = config, x0, config.alpha
        self.momentum = torch.zeros_like(x0)

    def __call__(self, xk: Tensor, grad: Tensor, rank: Tensor, step: int) -> Tensor:
        c = self.config
        if step in c.decay_steps:
            self.alpha *= c.decay_factor
        if c.momentum:
            self.momentum = c.momentum * self.momentum + grad / _per_example_norm(grad, 1)
            grad = self.momentum
        return _project(xk + self.alpha * _descent(grad, c.norm), self.x0, c.eps, c.norm)


class _APGDStep:
    """APGD's update (Croce & Hein, ICML 2020; `attacks-reference.md` §3.3), after fra31/auto-attack's
    `autopgd_base.py`: step eta = 2 eps; x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})) with
    z = P(x_k + eta * descent); at checkpoints (first at 0.22 N, then every max(previous - 0.03 N, 0.06 N) steps)
    eta halves and the run restarts from its best iterate when at most 75% of the steps since the last checkpoint
    improved, or when eta was not halved last time and the best did not improve.

    What it maximises is the engine's rank (success, then label reached, then -loss), so its step control and
    restarts serve the end-to-end verdict rather than the raw loss.
    """

    def __init__(self, config: PGDConfig, x0: Tensor):
        n, shape = config.steps, (-1, *([1] * (x0.dim() - 1)))
        self.config, self.x0, self.shape = config, x0, shape
        self.eta = torch.full((x0.shape[0],), 2 * config.eps, device=x0.device, dtype=x0.dtype)
        self.window, self.shrink, self.min_window = max(int(0.22 * n), 1), max(int(0.03 * n), 1), \
            max(int(0.06 * n), 1)
        self.since_check, self.improvements = 0, torch.zeros_like(self.eta)
        self.reduced_last = torch.zeros_like(self.eta, dtype=torch.bool)
        self.previous_x = self.previous_rank = self.best_x = self.best_grad = self.best_rank = None

    def __call__(self, xk: Tensor, grad: Tensor, rank: Tensor, step: int) -> Tensor:
        if step == 0:
            self.best_x, self.best_grad, self.best_rank = xk.clone(), grad.clone(), rank.clone()
            self.best_at_check, self.previous_x = rank.clone(), xk
        else:
            self.improvements += (rank > self.previous_rank).float()
            better = rank > self.best_rank
            self.best_x[better], self.best_grad[better], self.best_rank[better] = xk[better], grad[better], \
                rank[better]
            self.since_check += 1
            if self.since_check == self.window:
                reduce = (self.improvements <= 0.75 * self.window) | \
                    (~self.reduced_last & (self.best_at_check >= self.best_rank))
                self.eta[reduce] /= 2
                xk, grad = torch.where(reduce.view(self.shape), self.best_x, xk), \
                    torch.where(reduce.view(self.shape), self.best_grad, grad)
                self.reduced_last, self.best_at_check = reduce, self.best_rank.clone()
                self.window = max(self.window - self.shrink, self.min_window)
                self.since_check, self.improvements = 0, torch.zeros_like(self.eta)
        self.previous_rank = rank
        c = self.config
        z = _project(xk + self.eta.view(self.shape) * _descent(grad, c.norm), self.x0, c.eps, c.norm)
        a = 1.0 if step == 0 else 0.75
        x_next = _project(xk + a * (z - xk) + (1 - a) * (xk - self.previous_x), self.x0, c.eps, c.norm)
        self.previous_x = xk
        return x_next


def pgd(model: nn.Module | CushionedModel, x: Tensor, target: Tensor, objective: Objective, config: PGDConfig,
        cushion=None, surrogate: Surrogate | None = None) -> AttackResult:
    """Run the configured attack on a batch `x` (N x C x H x W in [0, 1]) towards `target` (N,)."""
    pipeline = model if isinstance(model, CushionedModel) else CushionedModel(model, cushion, surrogate)
    modes = {module: module.training for module in pipeline.modules()}
    pipeline.eval()
    x0 = x.detach()
    best_x, best_rank = x0.clone(), torch.full((x0.shape[0],), -float("inf"), device=x0.device,
                                                         dtype=torch.float64)
    best_success = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    best_reached = best_success.clone()
    curve: list[float] = []
    try:
        for restart in range(config.restarts):
            xk = (_project(_random_start(x0, config.eps, config.norm), x0, config.eps, config.norm)
                  if config.random_start else x0.clone())
            update = _APGDStep(config, x0) if config.optimiser == "apgd" else _PGDStep(config, x0)
            for step in range(config.steps + 1):  # the last pass only judges the final iterate
                grad, loss, reached, success = _gradient(pipeline, xk, target, objective, config)
                rank = _rank(success, reached, loss)
                better = rank > best_rank
                best_x[better], best_rank[better] = xk[better], rank[better]
                best_success[better], best_reached[better] = success[better], reached[better]
                if restart == 0:
                    curve.append(float(loss.mean()))
                if step == config.steps:
                    break
                xk = update(xk, grad, rank, step).detach()
    finally:
        for module, mode in modes.items():  # restore each submodule's own mode (a frozen classifier stays in eval)
            module.train(mode)
    # best_x was judged through the exact Cushion, which rounds to uint8 first, so quantising changes no verdict.
    return AttackResult(quantise(best_x), best_success, best_reached, curve)
