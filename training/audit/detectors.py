"""Detector baselines of paper Table 2 (`attacks-reference.md` §4) on tapped classifier features.

All share one protocol, so that the comparison is fair:
- `reference`: clean *training* images with labels: densities (KD), class means and covariance (MAHA), the LID
  reference batch. Never the evaluated images.
- `clean` / `adversarial`: a disjoint training subset, clean and attacked: the per-layer z-scoring (clean only),
  the logistic-regression combiner and the DNN detectors are fitted on it ("attack-aware", as in the literature).
- `score(features)`: higher = more adversarial, oriented by each method's definition, never by test data.

Layer combination: the paper averages the anomaly scores of all layers; raw per-layer scales differ by orders of
magnitude, so each layer's score is z-scored with clean statistics first (`combiner="mean"`, the default). The
original papers' logistic regression over layers is `combiner="lr"`. DNN sums the per-layer logits (paper), not the
HFC code's mean of sigmoids.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity, NearestNeighbors
from sklearn.preprocessing import StandardScaler
from torch import nn

from training.audit.features import Features


class LayerStatisticDetector:
    """A per-layer anomaly statistic plus the layer combiner; subclasses define `_fit_reference` and `layer_scores`."""

    name = "base"

    def __init__(self, combiner: str = "mean"):
        if combiner not in ("mean", "lr"):
            raise ValueError(f"combiner must be 'mean' or 'lr', got {combiner!r}")
        self.combiner = combiner

    def _fit_reference(self, reference: Features, labels: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_scores(self, features: Features) -> np.ndarray:  # pragma: no cover - abstract
        """N x L per-layer scores, higher = more adversarial."""
        raise NotImplementedError

    def fit(self, reference: Features, labels: np.ndarray, clean: Features, adversarial: Features):
        self._fit_reference(reference, labels)
        clean_scores, adv_scores = self.layer_scores(clean), self.layer_scores(adversarial)
        self.scaler = StandardScaler().fit(clean_scores)  # z-score each layer on clean statistics
        if self.combiner == "lr":
            z = self.scaler.transform(np.r_[clean_scores, adv_scores])
            y = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
            self.regression = LogisticRegression(max_iter=1000).fit(z, y)
        return self

    def score(self, features: Features) -> np.ndarray:
        layers = self.layer_scores(features)
        bad = np.flatnonzero(~np.isfinite(layers).all(0))
        if bad.size:
            raise ValueError(f"{self.name}: non-finite scores in layer column(s) {bad.tolist()} "
                             f"({int((~np.isfinite(layers)).sum())} values)")
        z = self.scaler.transform(layers)
        return z.mean(1) if self.combiner == "mean" else self.regression.decision_function(z)


class KernelDensityDetector(LayerStatisticDetector):
    """KD (Feinman et al. 2017): -log density of the predicted class's Gaussian KDE, per layer, plus (when the
    features carry it) the MC-dropout Bayesian uncertainty as one more column.

    Features are standardised per layer on the reference set and the bandwidth is chosen per (layer, class) by
    cross-validated likelihood (sklearn `GridSearchCV`), avoiding the HFC code's single default bandwidth of 1.0.
    """

    name = "kd"

    def __init__(self, combiner: str = "mean", bandwidths: np.ndarray | None = None, folds: int = 3):
        super().__init__(combiner)
        self.bandwidths, self.folds = bandwidths, folds

    def _fit_reference(self, reference: Features, labels: np.ndarray) -> None:
        self.scalers, self.kdes = [], []
        for layer in reference.pooled:
            scaler = StandardScaler().fit(layer)
            z = scaler.transform(layer)
            grid = self.bandwidths if self.bandwidths is not None else np.sqrt(z.shape[1]) * np.logspace(-1.5, 0.5, 9)
            per_class = {}
            for c in np.unique(labels):
                members = z[labels == c]
                search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": grid},
                                      cv=min(self.folds, len(members)))
                per_class[int(c)] = search.fit(members).best_estimator_
            self.scalers.append(scaler)
            self.kdes.append(per_class)

    def layer_scores(self, features: Features) -> np.ndarray:
        pred = features.pred
        columns = []
        for layer, scaler, kdes in zip(features.pooled, self.scalers, self.kdes):
            z = scaler.transform(layer)
            score = np.empty(len(z))
            for c, kde in kdes.items():
                mask = pred == c
                if mask.any():
                    score[mask] = -kde.score_samples(z[mask])
            columns.append(score)
        if features.uncertainty is not None:
            columns.append(features.uncertainty)
        return np.stack(columns, axis=1)


class LIDDetector(LayerStatisticDetector):
    """LID (Ma et al., ICLR 2018): maximum-likelihood local intrinsic dimensionality per layer,
    LID(x) = -(1/k sum_i log(r_i / r_k))^-1, over the k nearest neighbours in one fixed batch of clean reference
    features. Queries are never members of that batch (the protocol keeps reference and scored sets disjoint), so no
    neighbour is dropped: the reference code's `[:, 1:k+1]` would drop a genuine neighbour of every non-member.
    """

    name = "lid"

    def __init__(self, combiner: str = "mean", k: int = 20, batch_size: int = 100, seed: int = 0):
        super().__init__(combiner)
        self.k, self.batch_size, self.seed = k, batch_size, seed

    def _fit_reference(self, reference: Features, labels: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        chosen = rng.permutation(len(reference))[:self.batch_size]
        self.k_used = min(self.k, len(chosen))
        self.neighbours = [NearestNeighbors(n_neighbors=self.k_used).fit(layer[chosen]) for layer in reference.pooled]

    def layer_scores(self, features: Features) -> np.ndarray:
        columns = []
        for layer, nn_index in zip(features.pooled, self.neighbours):
            distances, _ = nn_index.kneighbors(layer)
            distances = np.maximum(distances, 1e-12)
            columns.append(-1.0 / np.mean(np.log(distances / distances[:, -1:]), axis=1).clip(max=-1e-12))
        return np.stack(columns, axis=1)


class MahalanobisDetector(LayerStatisticDetector):
    """MAHA (Lee et al., NeurIPS 2018): per layer, class means and one tied covariance of the pooled reference
    features; the score is the smallest squared Mahalanobis distance to a class mean (= -M_l, Lee's confidence
    negated). Covariance: Ledoit-Wolf shrinkage by default, since C_l approaches the number of images per class;
    `covariance="empirical"` is Lee's `EmpiricalCovariance`. Lee's input pre-processing is not applied (off).
    """

    name = "maha"

    def __init__(self, combiner: str = "mean", covariance: str = "ledoit_wolf"):
        super().__init__(combiner)
        estimators = {"ledoit_wolf": LedoitWolf, "empirical": EmpiricalCovariance}
        if covariance not in estimators:
            raise ValueError(f"covariance must be one of {sorted(estimators)}, got {covariance!r}")
        self.estimator = estimators[covariance]

    def _fit_reference(self, reference: Features, labels: np.ndarray) -> None:
        self.classes = np.unique(labels)
        self.means, self.covariances = [], []
        for layer in reference.pooled:
            means = np.stack([layer[labels == c].mean(0) for c in self.classes])
            centred = layer - means[np.searchsorted(self.classes, labels)]
            self.means.append(means)
            self.covariances.append(self.estimator(assume_centered=True).fit(centred))

    def distances(self, pooled: list[np.ndarray]) -> np.ndarray:
        """N x L: min over classes of the squared Mahalanobis distance, per layer."""
        return np.stack([np.min([cov.mahalanobis(layer - mu) for mu in means], axis=0)
                         for layer, means, cov in zip(pooled, self.means, self.covariances)], axis=1)

    def layer_scores(self, features: Features) -> np.ndarray:
        return self.distances(features.pooled)


class _ConvDetector(nn.Module):
    """Metzen et al.'s detector, sized for small maps: conv-BN-ReLU x2 (pool when the map allows), 1x1 conv, GAP."""

    def __init__(self, channels: int, side: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2) if side >= 8 else nn.Identity(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


class DNNDetector:
    """DNN (Metzen et al., ICLR 2017): one small conv detector per tapped layer, trained (classifier frozen) on clean
    vs adversarial maps with BCE; the paper's ensemble sums the per-layer logits (logit high = adversarial).
    Static training on a fixed adversarial set (not Metzen's dynamic adversary)."""

    name = "dnn"

    def __init__(self, iterations: int = 200, batch_size: int = 64, lr: float = 1e-3, width: int = 32, seed: int = 0):
        self.iterations, self.batch_size, self.lr, self.width, self.seed = iterations, batch_size, lr, width, seed

    def fit(self, reference: Features, labels: np.ndarray, clean: Features, adversarial: Features):
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.nets = []
            for k, (c_map, a_map) in enumerate(zip(clean.maps, adversarial.maps)):
                x = torch.from_numpy(np.r_[c_map, a_map])
                y = torch.cat([torch.zeros(len(c_map)), torch.ones(len(a_map))])
                # Class-balanced batches: the adversarial set may be smaller (only successful attacks are kept).
                weights = torch.where(y == 1, 1.0 / max(len(a_map), 1), 1.0 / max(len(c_map), 1))
                net = _ConvDetector(x.shape[1], x.shape[-1], self.width)
                optimizer = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=1e-4)
                net.train()
                for _ in range(self.iterations):
                    idx = torch.multinomial(weights, self.batch_size, replacement=True, generator=generator)
                    loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                self.nets.append(net.eval())
        return self

    @torch.no_grad()
    def score(self, features: Features) -> np.ndarray:
        return sum(net(torch.from_numpy(m)).numpy() for net, m in zip(self.nets, features.maps))


DETECTORS = {"kd": KernelDensityDetector, "lid": LIDDetector, "maha": MahalanobisDetector, "dnn": DNNDetector}


def make_detector(name: str, **kwargs):
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)
