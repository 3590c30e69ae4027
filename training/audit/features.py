"""Features of the tapped classifier (`AegisNet.classifier`) that the detector baselines consume.

For each tap: the activation map (spatially average-pooled down to at most `MAX_SIDE` x `MAX_SIDE`, which keeps
paper-scale ResNet-50 maps in memory; the DNN detector reads these) and its global average (KD, LID, MAHA read
these, as in the HFC code). Optionally the Bayesian uncertainty of Feinman et al. by MC dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.cushion import CushionBase
from training.attacks import exact_cushion

MAX_SIDE = 16


@dataclass
class Features:
    maps: list[np.ndarray]  # per tap: N x C x h x w, float32
    logits: np.ndarray  # N x K
    uncertainty: np.ndarray | None = None  # N, MC-dropout variance (high = uncertain)

    @property
    def pred(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def pooled(self) -> list[np.ndarray]:
        return [m.mean(axis=(2, 3)) for m in self.maps]

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, index) -> Features:
        return Features([m[index] for m in self.maps], self.logits[index],
                        None if self.uncertainty is None else self.uncertainty[index])


def mc_dropout_uncertainty(classifier, x: torch.Tensor, passes: int, p: float = 0.5) -> torch.Tensor:
    """Feinman et al.'s BU: mean_i ||y_i||^2 - ||mean_i y_i||^2 over `passes` stochastic softmax outputs.

    VGG heads have dropout and use it as trained. ResNets have none; the documented substitute is dropout with rate
    `p` on the pooled penultimate features before the final linear layer (`attacks-reference.md` §4.1), so only the
    head is re-run per pass.
    """
    h = classifier.stem(classifier.normalise(x))
    for module in classifier.body:
        h = module(h)
    *pre, last = classifier.head
    has_dropout = any(isinstance(m, nn.Dropout) for m in pre)
    probs = []
    for _ in range(passes):
        z = h
        for module in pre:
            z = F.dropout(z, module.p, training=True) if isinstance(module, nn.Dropout) else module(z)
        if not has_dropout:
            z = F.dropout(z, p, training=True)
        probs.append(torch.softmax(last(z), dim=1))
    stacked = torch.stack(probs)  # T x N x K
    return stacked.pow(2).sum(2).mean(0) - stacked.mean(0).pow(2).sum(1)


@torch.no_grad()
def extract(classifier, x: torch.Tensor, cushion: CushionBase | None = None, bu_passes: int = 0, batch: int = 64,
            seed: int = 0) -> Features:
    """Tap features of `x` (through the exact Cushion when given), in eval mode."""
    classifier.eval()
    maps: list[list[np.ndarray]] = []
    logits, uncertainty = [], []
    with torch.random.fork_rng():  # MC dropout draws must not disturb (or depend on) the caller's RNG
        torch.manual_seed(seed)
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            xb = exact_cushion(xb, cushion) if cushion is not None else xb
            out, taps = classifier.forward_with_taps(xb)
            for k, t in enumerate(taps):
                if t.shape[-1] > MAX_SIDE or t.shape[-2] > MAX_SIDE:
                    t = F.adaptive_avg_pool2d(t, (min(t.shape[-2], MAX_SIDE), min(t.shape[-1], MAX_SIDE)))
                if i == 0:
                    maps.append([])
                maps[k].append(t.numpy())
            logits.append(out.numpy())
            if bu_passes:
                uncertainty.append(mc_dropout_uncertainty(classifier, xb, bu_passes).numpy())
    return Features([np.concatenate(m) for m in maps], np.concatenate(logits),
                    np.concatenate(uncertainty) if bu_passes else None)
