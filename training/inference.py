"""Batched, gradient-free forward passes of a trained model through the exact Cushion: the one `predict` that
training, calibration, evaluation and the audit share."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from models.cushion import CushionBase
from training.attacks import exact_cushion


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, cushion: CushionBase | None, batch: int = 256,
            device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, shield logits) of `model` on the Cushioned images `x` (Cushion None: bypass it).

    `model` is an `AegisNet` (logits and Shield logits) or a classifier alone (Shield logits None); inputs are moved
    to `device` batch by batch, outputs come back as float32 numpy arrays.
    """
    logits, shields = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        xb = exact_cushion(xb, cushion) if cushion is not None else xb
        out = model(xb if device is None else xb.to(device))
        first, second = out if isinstance(out, tuple) else (out, None)
        logits.append(first.float().cpu().numpy())
        if second is not None:
            shields.append(second.float().cpu().numpy())
    return np.concatenate(logits), (np.concatenate(shields) if shields else None)
