"""The torch side of the model layer: tapped classifier, per-class Shields and their composition.

Only training, evaluation and export import this module (it needs torch + torchvision); the service runs the exported
ONNX graph instead. Inputs are float images in [0, 1]; ImageNet normalisation lives inside the classifier, so
attack budgets are always pixel budgets.

Tap indexing (paper §4.1, `attacks-reference.md` §8) is 1-indexed: for ResNets, over residual blocks in forward order
(ResNet-50 [1, 4, 8, 14] = the first block of each stage); for VGG, over the ReLUs of `features`
(VGG-16 [3, 6, 9, 12] = conv2_1, conv3_2, conv4_2, conv5_2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from models.bundle import ArchitectureSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneInfo:
    factory: object
    family: str  # "resnet" | "vgg"
    default_taps: tuple[int, ...]


BACKBONES: dict[str, BackboneInfo] = {
    "resnet18": BackboneInfo(torchvision.models.resnet18, "resnet", (1, 3, 5, 7)),  # first block of each stage
    "resnet50": BackboneInfo(torchvision.models.resnet50, "resnet", (1, 4, 8, 14)),  # paper
    "vgg16": BackboneInfo(torchvision.models.vgg16, "vgg", (3, 6, 9, 12)),  # paper
}


class TappedClassifier(nn.Module):
    """A torchvision backbone that returns its logits and the activations at the chosen taps.

    Args:
        backbone: a key of `BACKBONES`.
        num_classes: output logits.
        in_channels: 1 (grayscale, replicated to RGB inside) or 3.
        taps: 1-indexed blocks (ResNet) or ReLU layers (VGG); defaults to the backbone's paper-style taps.
        pretrained: optional path to a local torchvision state dict for the backbone (ImageNet weights); the
            classification layer is replaced afterwards. Nothing is ever downloaded.
    """

    def __init__(self, backbone: str, num_classes: int, in_channels: int = 3, taps: tuple[int, ...] | None = None,
                 pretrained: str | Path | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        info = BACKBONES[backbone]
        net = info.factory(weights=None)
        if pretrained is not None:
            net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        self.backbone_name, self.family, self.in_channels = backbone, info.family, in_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        if info.family == "resnet":
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.body = nn.ModuleList([block for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
                                       for block in layer])
            self.head = nn.Sequential(net.avgpool, nn.Flatten(), nn.Linear(net.fc.in_features, num_classes))
            tappable = list(range(1, len(self.body) + 1))
            self._tap_positions = {i: i for i in tappable}  # block i is body[i - 1]
            self.tap_names_all = {i: f"block{i}" for i in tappable}
        else:
            self.stem = nn.Identity()
            self.body = nn.ModuleList(list(net.features))
            relu_positions = [pos for pos, m in enumerate(net.features, 1) if isinstance(m, nn.ReLU)]
            self._tap_positions = {i: pos for i, pos in enumerate(relu_positions, 1)}
            self.tap_names_all = {i: f"relu{i}(features.{pos - 1})" for i, pos in self._tap_positions.items()}
            classifier = list(net.classifier)
            classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
            self.head = nn.Sequential(net.avgpool, nn.Flatten(), *classifier)
        self.taps = tuple(taps) if taps is not None else info.default_taps
        bad = [t for t in self.taps if t not in self._tap_positions]
        if bad or list(self.taps) != sorted(set(self.taps)):
            raise ValueError(f"taps must be increasing and within {min(self._tap_positions)}.."
                             f"{max(self._tap_positions)} for {backbone}, got {list(self.taps)}")

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(self.tap_names_all[t] for t in self.taps)

    def normalise(self, x: Tensor) -> Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward_with_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.forward_layers(x, self.taps)

    def forward_layers(self, x: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """Logits and the outputs of the 1-indexed blocks/ReLUs `layers` (in that order), in one forward pass."""
        unknown = [layer for layer in layers if layer not in self._tap_positions]
        if unknown:
            raise ValueError(f"unknown layers {unknown} for {self.backbone_name}")
        outputs = {}
        wanted = {self._tap_positions[layer] for layer in layers}
        h = self.stem(self.normalise(x))
        for position, module in enumerate(self.body, 1):
            h = module(h)
            if position in wanted:
                outputs[position] = h
        return self.head(h), [outputs[self._tap_positions[layer]] for layer in layers]

    @property
    def layers(self) -> tuple[int, ...]:
        """Every tappable 1-indexed layer (all residual blocks, or all ReLUs of VGG `features`)."""
        return tuple(self._tap_positions)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_taps(x)[0]

    def activation(self, x: Tensor, layer: int) -> Tensor:
        """The output of 1-indexed block/ReLU `layer` (for stress tests of any layer, not only the taps)."""
        h = self.stem(self.normalise(x))
        stop = self._tap_positions[layer]
        for position, module in enumerate(self.body, 1):
            h = module(h)
            if position == stop:
                return h
        raise AssertionError("unreachable")  # pragma: no cover


def _tap_branches(tap_channels: list[int], width: int) -> nn.ModuleList:
    """A small conv branch per tap, pooled to `width` features each (concatenated by the caller)."""
    return nn.ModuleList([
        nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        for c in tap_channels
    ])


def _shield_head(width: int, n_taps: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width * n_taps, width), nn.ReLU(inplace=True), nn.Linear(width, 1))


class ShieldNet(nn.Module):
    """One class's detector on multi-layer features (paper §3): a small conv branch per tap, pooled, then an MLP.

    Returns one logit per image, high = clean (the paper's S; `attacks-reference.md` §0.4).
    """

    def __init__(self, tap_channels: list[int], width: int = 32):
        super().__init__()
        self.branches = _tap_branches(tap_channels, width)
        self.head = _shield_head(width, len(tap_channels))

    def forward(self, taps: list[Tensor]) -> Tensor:
        return self.head(torch.cat([branch(t) for branch, t in zip(self.branches, taps)], dim=1)).squeeze(1)


class SharedTrunkShields(nn.Module):
    """Every class's Shield on one shared trunk (the tap branches) with a head per class: still one logit per class
    (the bundle contract), for about the cost of one paper Shield, and a trunk trained on every class's images.

    Returns N x K logits, high = clean.
    """

    def __init__(self, tap_channels: list[int], num_classes: int, width: int = 32):
        super().__init__()
        self.branches = _tap_branches(tap_channels, width)
        self.heads = nn.ModuleList([_shield_head(width, len(tap_channels)) for _ in range(num_classes)])

    def forward(self, taps: list[Tensor]) -> Tensor:
        features = torch.cat([branch(t) for branch, t in zip(self.branches, taps)], dim=1)
        return torch.cat([head(features) for head in self.heads], dim=1)


class MarginShields(nn.Module):
    """The classifier as its own detector, without weights: class c's Shield logit is the classifier's log-odds of c,
    z_c - logsumexp_{j != c} z_j, so that "accept" means "confident enough". On a robust classifier an attack's
    features look like the target class's, and telling them apart is as hard as classifying robustly (Tramèr 2022):
    this is the baseline a learned Shield must beat there, and the rejection by confidence that rejection-aware
    adversarial training deploys (Stutz et al. 2020; Pang et al. 2022; `joint_epochs` trains the classifier for it).

    Returns N x K logits, high = clean.
    """

    def forward(self, logits: Tensor) -> Tensor:
        k = logits.shape[1]
        others = logits.unsqueeze(1) - 1e4 * torch.eye(k, dtype=logits.dtype, device=logits.device)
        return logits - torch.logsumexp(others, dim=2)  # row c of `others`: every logit but z_c


SHIELD_KINDS = ("per_class", "shared_trunk", "margin")


class AegisNet(nn.Module):
    """Classifier + one Shield per class. `forward(x)` -> (logits N x K, shield_logits N x K): the ONNX graph.

    `shields`: a ModuleList of `ShieldNet` (the paper's, one network per class), a `SharedTrunkShields` or
    `MarginShields` (no weights: the classifier's own log-odds).
    """

    def __init__(self, classifier: TappedClassifier, shields: nn.ModuleList | SharedTrunkShields | MarginShields):
        super().__init__()
        self.classifier = classifier
        self.shields = shields

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        logits, taps = self.classifier.forward_with_taps(x)
        return logits, self.shield_logits(taps, logits), taps

    def shield_logits(self, taps: list[Tensor], logits: Tensor) -> Tensor:
        """N x K Shield logits from the classifier's taps and logits (each kind reads what it needs)."""
        if isinstance(self.shields, MarginShields):
            return self.shields(logits)
        if isinstance(self.shields, SharedTrunkShields):
            return self.shields(taps)
        return torch.stack([shield(taps) for shield in self.shields], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, shield_logits, _ = self.forward_all(x)
        return logits, shield_logits

    @property
    def shield_kind(self) -> str:
        if isinstance(self.shields, MarginShields):
            return "margin"
        return "shared_trunk" if isinstance(self.shields, SharedTrunkShields) else "per_class"

    def architecture(self) -> ArchitectureSpec:
        """What a bundle's manifest records to rebuild this network with `build_aegis` (`load_aegis`)."""
        width = None
        if not isinstance(self.shields, MarginShields):
            branches = self.shields.branches if isinstance(self.shields, SharedTrunkShields) else self.shields[0].branches
            width = branches[0][0].out_channels
        return ArchitectureSpec(backbone=self.classifier.backbone_name, taps=tuple(self.classifier.taps),
                                tap_names=self.classifier.tap_names, shield_width=width, shield_kind=self.shield_kind)


def tap_channels(classifier: TappedClassifier, input_size: tuple[int, int]) -> list[int]:
    with torch.no_grad():
        was_training = classifier.training
        classifier.eval()
        _, taps = classifier.forward_with_taps(torch.zeros(1, classifier.in_channels, *input_size))
        classifier.train(was_training)
    return [t.shape[1] for t in taps]


def build_aegis(backbone: str, num_classes: int, in_channels: int, input_size: tuple[int, int],
                taps: tuple[int, ...] | None = None, shield_width: int | None = 32,
                pretrained: str | Path | None = None, shield_kind: str = "per_class") -> AegisNet:
    if shield_kind not in SHIELD_KINDS:
        raise ValueError(f"shield_kind must be one of {SHIELD_KINDS}, got {shield_kind!r}")
    classifier = TappedClassifier(backbone, num_classes, in_channels, taps, pretrained)
    if shield_kind == "margin":
        return AegisNet(classifier, MarginShields())
    channels = tap_channels(classifier, input_size)
    if shield_kind == "shared_trunk":
        return AegisNet(classifier, SharedTrunkShields(channels, num_classes, shield_width))
    return AegisNet(classifier, nn.ModuleList([ShieldNet(channels, shield_width) for _ in range(num_classes)]))


def load_aegis(bundle) -> AegisNet:
    """Rebuild the torch model of a `models.bundle.Bundle` from its weights.pt (for white-box audits)."""
    m = bundle.manifest
    net = build_aegis(m.architecture.backbone, len(m.classes), m.input.channels, (m.input.height, m.input.width),
                      tuple(m.architecture.taps), m.architecture.shield_width,
                      shield_kind=m.architecture.shield_kind)
    net.load_state_dict(torch.load(bundle.weights_path, map_location="cpu", weights_only=True))
    return net.eval()
