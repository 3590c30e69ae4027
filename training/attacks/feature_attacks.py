"""What the feature-space attacks need before they run: guide images for Fea and the per-class Gaussian mixtures of
HFC, both taken from the features the defended model sees, i.e. of Cushioned training images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.cushion import CushionBase
from training.attacks.engine import CushionedModel
from training.attacks.objectives import GaussianMixture, Objective


@torch.no_grad()
def _features(pipeline: CushionedModel, x: Tensor, layers: tuple[int, ...], batch: int = 128):
    """(logits, shield logits, features per layer) of `x` through the exact Cushion, in batches."""
    outs = [pipeline(x[i:i + batch], layers) for i in range(0, len(x), batch)]
    logits = torch.cat([o[0] for o in outs])
    shields = None if outs[0][1] is None else torch.cat([o[1] for o in outs])
    return logits, shields, [torch.cat([o[2][j] for o in outs]) for j in range(len(layers))]


def nearest_guides(model: nn.Module, x: Tensor, target: Tensor, pool_x: Tensor, pool_y: Tensor,
                   layers: tuple[int, ...], cushion=None, objective: Objective | None = None) -> tuple[Tensor, ...]:
    """Per attacked image, the features at `layers` of its nearest guide: a pool image of the target class that the
    pipeline classifies as that class (and, with thresholds in `objective`, accepts), nearest in the same per-layer
    mean squared distance the Fea objective minimises."""
    pipeline = CushionedModel(model, cushion)
    judge = objective if objective is not None else Objective()
    logits, shields, pool_features = _features(pipeline, pool_x, layers)
    eligible = judge.success(logits, shields, pool_y) & (pool_y == logits.argmax(1))
    _, _, own = _features(pipeline, x, layers)
    distance = sum(torch.cdist(f.flatten(1), p.flatten(1)).pow(2) / f[0].numel()
                   for f, p in zip(own, pool_features))
    allowed = eligible[None, :] & (pool_y[None, :] == target[:, None])
    if not allowed.any(1).all():
        raise ValueError("the guide pool has no correctly classified (and accepted) image of some target class")
    chosen = distance.masked_fill(~allowed, float("inf")).argmin(1)
    return tuple(p[chosen] for p in pool_features)


def fit_hfc_mixtures(model: nn.Module, x: Tensor, y: Tensor, cushion: CushionBase | None = None, layers: tuple[int, ...] | None = None,
                     n_components: int = 1, reg_covar: float = 1e-3, max_channels: int = 512, seed: int = 0
                     ) -> tuple[tuple[int, ...], tuple[tuple[GaussianMixture, ...], ...]]:
    """Fit HFC's per-class, per-layer mixtures on spatially averaged features of Cushioned training images.

    Follows the official `get_GMM.py` (sklearn `BayesianGaussianMixture`, full covariance, n_init 2, max_iter
    1000; one component by default, as `HFC_Attack.py`'s CLI) and constrains every tappable layer with at most
    `max_channels` channels (the official attack skips wider ones). `reg_covar` is raised from sklearn's 1e-6:
    with a few hundred images per class the covariance of a 512-d layer is singular, and its null directions
    would dominate the whitened loss. Returns (layers, mixtures[class][layer]).
    """
    from sklearn.mixture import BayesianGaussianMixture  # lazy: only HFC needs sklearn's mixtures

    classifier = getattr(model, "classifier", model)
    pipeline = CushionedModel(classifier, cushion)
    candidates = tuple(classifier.layers) if layers is None else tuple(layers)
    _, _, probe = _features(pipeline, x[:1], candidates)
    chosen = tuple(layer for layer, f in zip(candidates, probe) if f.shape[1] <= max_channels)
    _, _, features = _features(pipeline, x, chosen)
    pooled = [f.flatten(2).mean(2).double().numpy() for f in features]
    mixtures = []
    for c in range(int(y.max()) + 1):
        rows = (y == c).numpy()
        per_layer = []
        for g in pooled:
            fit = BayesianGaussianMixture(n_components=n_components, covariance_type="full", n_init=2,
                                          max_iter=1000, reg_covar=reg_covar, random_state=seed).fit(g[rows])
            per_layer.append(GaussianMixture(torch.from_numpy(fit.means_).float(),
                                             torch.from_numpy(fit.precisions_cholesky_).float(),
                                             torch.from_numpy(fit.weights_).float().log()))
        mixtures.append(tuple(per_layer))
    return chosen, tuple(mixtures)
