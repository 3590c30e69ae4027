"""Carlini-Wagner L2 (IEEE S&P 2017; `attacks-reference.md` §1.9), after carlini/nn_robust_attacks `l2_attack.py`.

Why it is not a `PGDConfig`: CW-L2 is a minimum-distortion attack. It optimises an unconstrained variable w in
tanh space (x' = (tanh w + 1) / 2: the box for free) with Adam on ||x' - x||^2 + c * f(x'), and searches c per
example (binary search, Adam reset at each outer step), keeping the smallest successful distortion over all runs.
There is no budget to project onto, no sign or normalised step, and the outer search changes the objective per
example; forcing that into the PGD loop would either change the attack or turn the engine into two loops.

It shares everything else with the engine: the pipeline (exact Cushion forward, BPDA backward), the objectives
(f = label loss + detector loss, e.g. the CW margin or the WB objective) and the verdict. With `eps` set, each
candidate is first projected onto the L2 ball (uint8-aware) so that the result is a bounded attack.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.attacks.bpda import Surrogate
from training.attacks.engine import AttackResult, CushionedModel, _project, judge, quantise
from training.attacks.objectives import CWObjective, Objective


def cw_l2(model: nn.Module | CushionedModel, x: Tensor, target: Tensor, objective: Objective | None = None,
          cushion=None, surrogate: Surrogate | None = None, eps: float | None = None, search_steps: int = 9,
          max_iterations: int = 1000, learning_rate: float = 1e-2, initial_const: float = 1e-3,
          abort_early: bool = True) -> AttackResult:
    """Targeted CW-L2 on a batch. Defaults are the original's except 1 000 iterations (it uses 10 000)."""
    objective = objective if objective is not None else CWObjective(kappa=0.0)
    pipeline = model if isinstance(model, CushionedModel) else CushionedModel(model, cushion, surrogate)
    modes = {module: module.training for module in pipeline.modules()}
    pipeline.eval()
    x0, n = x.detach(), x.shape[0]
    w0 = torch.atanh((2 * x0 - 1) * 0.999999)
    low, high = torch.zeros(n, dtype=torch.float64), torch.full((n,), 1e10, dtype=torch.float64)
    const = torch.full((n,), initial_const, dtype=torch.float64)
    best_x, best_norm = x0.clone(), torch.full((n,), float("inf"))
    curve: list[float] = []
    try:
        for outer in range(search_steps):
            w = w0.clone().requires_grad_(True)
            optimiser = torch.optim.Adam([w], lr=learning_rate)  # fresh state at every outer step
            found = torch.zeros(n, dtype=torch.bool)
            previous = float("inf")
            for iteration in range(max_iterations + 1):  # the last pass only judges the final iterate
                candidate = (torch.tanh(w) + 1) / 2
                if eps is not None:
                    candidate = _project(candidate, x0, eps, "l2")
                logits, shield_logits, features = pipeline(candidate, objective.layers)
                label_loss, detector_loss = objective.losses(logits, shield_logits, target, features)
                f = label_loss if detector_loss is None else label_loss + detector_loss
                distortion = (candidate - x0).flatten(1).pow(2).sum(1)
                loss = (distortion + const.to(f.dtype) * f).sum()
                with torch.no_grad():
                    success = objective.success(logits, shield_logits, target)
                    norm = (quantise(candidate) - x0).flatten(1).norm(dim=1)  # what the Cushion judged
                    better = success & (norm < best_norm)
                    best_x[better], best_norm[better] = candidate[better], norm[better]
                    found |= success
                if outer == 0:
                    curve.append(loss.item() / n)
                if iteration == max_iterations:
                    break
                if abort_early and iteration % max(max_iterations // 10, 1) == 0:
                    if loss.item() > previous * 0.9999:
                        break
                    previous = loss.item()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            high = torch.where(found, torch.minimum(high, const), high)
            low = torch.where(found, low, torch.maximum(low, const))
            const = torch.where(found | (high < 1e9), (low + high) / 2, const * 10)
        x_adv = quantise(best_x)  # the smallest successful candidate (x itself where none succeeded)
        success, reached = judge(pipeline, x_adv, target, objective)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return AttackResult(x_adv, success, reached, curve)
