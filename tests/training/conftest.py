"""A small ResNet-18 trained for a few seconds on real X-rays at 32 px: the undefended model the attack tests use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.cushion import JpegCushion
from models.imaging import InputSpec
from models.networks import build_aegis
from training.attacks import exact_cushion
from training.data import load_images, load_records, split_validation

SIZE = 32


@pytest.fixture(scope="session")
def xray_data(kermany_dir):
    """(train x, train y, test x, test y): 600 train and 96 test images, float N x 1 x 32 x 32 in [0, 1]."""
    records = split_validation(load_records("kermany", kermany_dir), 0.15, 0)
    rng = np.random.default_rng(0)
    spec = InputSpec(channels=1, height=SIZE, width=SIZE)

    def take(split, n):
        chosen = [r for r in records if r.split == split]
        chosen = [chosen[i] for i in sorted(rng.permutation(len(chosen))[:n])]
        x = torch.from_numpy(load_images(chosen, spec)).permute(0, 3, 1, 2).float() / 255
        return x, torch.tensor([r.label for r in chosen])

    return (*take("train", 600), *take("test", 96))


@pytest.fixture(scope="session")
def small_net(xray_data):
    """AegisNet whose classifier is trained (Shields untrained), eval mode."""
    torch.manual_seed(0)
    x, y, _, _ = xray_data
    net = build_aegis("resnet18", 2, 1, (SIZE, SIZE), shield_width=16)
    optimizer = torch.optim.Adam(net.classifier.parameters(), lr=2e-3)
    weight = torch.tensor([2.0, 0.7])
    net.train()
    for _ in range(5):
        for i in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net.classifier(x[i]), y[i], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@pytest.fixture(scope="session")
def batch(small_net, xray_data):
    """32 test images that the undefended model classifies correctly, and the other class as target."""
    _, _, x, y = xray_data
    with torch.no_grad():
        correct = small_net.classifier(x).argmax(1) == y
    x, y = x[correct][:32], y[correct][:32]
    assert len(y) >= 24, "the small model should classify most test images correctly"
    return x, y, 1 - y


@pytest.fixture(scope="session")
def thresholds(small_net, xray_data):
    """Per-class median Shield logit of clean Cushioned test images: half the clean images would be rejected."""
    _, _, x, _ = xray_data
    with torch.no_grad():
        logits, shields = small_net(exact_cushion(x, JpegCushion()))
    pred = logits.argmax(1)
    return torch.stack([shields[pred == c, c].median() for c in range(2)])
