"""BPDA through the Cushion (Athalye et al., ICML 2018): the exact Cushion forward, an approximate backward.

The forward pass is the served Cushion itself (`models.cushion`, on the uint8-rounded image), so an attack is
judged on exactly what the service would compute. The backward pass is the identity (the paper's BPDA) or, when a
differentiable surrogate is given (e.g. kornia's differentiable JPEG), the surrogate's vector-Jacobian product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.cushion import CushionBase, NoCushion

Surrogate = Callable[[Tensor], Tensor]


def exact_cushion(x: Tensor, cushion: CushionBase) -> Tensor:
    """The Cushion on a float batch in [0, 1] (rounded to uint8 first), as a tensor without gradient."""
    out = cushion.apply_batch(x.detach().cpu().numpy())
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


def through_cushion(x: Tensor, cushion: CushionBase | None = None, surrogate: Surrogate | None = None) -> Tensor:
    """Straight-through composition: value = Cushion(x) exactly; gradient = identity or d surrogate(x) / dx."""
    cushion = cushion if cushion is not None else NoCushion()
    exact = exact_cushion(x, cushion)
    approx = x if surrogate is None else surrogate(x)
    return approx + (exact - approx).detach()
