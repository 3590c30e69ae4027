import pytest
import torch

from models.networks import TappedClassifier, build_aegis


@pytest.mark.parametrize("backbone, channels", [
    ("resnet18", [64, 128, 256, 512]),    # first block of each stage
    ("resnet50", [256, 512, 1024, 2048]),  # paper blocks [1, 4, 8, 14]
    ("vgg16", [128, 256, 512, 512]),       # paper ReLUs [3, 6, 9, 12] = conv2_1, conv3_2, conv4_2, conv5_2
])
def test_default_taps_land_on_the_documented_layers(backbone, channels):
    model = TappedClassifier(backbone, num_classes=2, in_channels=1).eval()
    with torch.no_grad():
        logits, taps = model.forward_with_taps(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 2)
    assert [t.shape[1] for t in taps] == channels


def test_vgg_tap_names_point_at_relus():
    model = TappedClassifier("vgg16", 2, 3)
    assert model.tap_names == ("relu3(features.6)", "relu6(features.13)", "relu9(features.20)",
                               "relu12(features.27)")


def test_gradients_reach_the_input_through_taps_and_shields():
    net = build_aegis("resnet18", 2, 1, (32, 32), shield_width=8).eval()
    x = torch.rand(3, 1, 32, 32, requires_grad=True)
    logits, shield_logits = net(x)
    assert shield_logits.shape == (3, 2)
    shield_logits[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.shields[1].parameters())
    assert all(p.grad is None or not p.grad.any() for p in net.shields[0].parameters())  # separate networks


def test_normalisation_is_inside_the_model():
    model = TappedClassifier("resnet18", 2, 1).eval()
    x = torch.full((1, 1, 32, 32), 0.5)
    normalised = model.normalise(x)
    assert torch.allclose(normalised[0, :, 0, 0], (0.5 - model.mean.flatten()) / model.std.flatten())


def test_grayscale_input_equals_replicated_rgb():
    torch.manual_seed(0)
    gray = TappedClassifier("resnet18", 2, 1).eval()
    rgb = TappedClassifier("resnet18", 2, 3).eval()
    rgb.load_state_dict(gray.state_dict())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-6)


@pytest.mark.parametrize("taps", [(0, 2), (3, 1), (1, 9)])
def test_invalid_taps_are_refused(taps):
    with pytest.raises(ValueError, match="taps"):
        TappedClassifier("resnet18", 2, 1, taps=taps)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        TappedClassifier("alexnet", 2, 1)


def test_local_pretrained_weights_are_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = TappedClassifier("resnet18", 2, 3, pretrained=tmp_path / "resnet18.pth")
    assert torch.equal(model.stem[0].weight, reference.conv1.weight)


def test_a_shared_trunk_gives_one_logit_per_class_for_the_conv_cost_of_one_shield():
    torch.manual_seed(0)
    per_class = build_aegis("resnet18", 3, 1, (32, 32), shield_width=16)
    shared = build_aegis("resnet18", 3, 1, (32, 32), shield_width=16, shield_kind="shared_trunk")
    x = torch.rand(4, 1, 32, 32)
    logits, shields = shared.eval()(x)
    assert logits.shape == shields.shape == (4, 3)

    def conv_weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d))

    assert conv_weights(shared.shields) * 3 == conv_weights(per_class.shields)
    # each class's logit is its own head on the same trunk features: changing one head moves one column only
    with torch.no_grad():
        shared.shields.heads[1][-1].bias += 5.0
        _, moved = shared(x)
    torch.testing.assert_close(moved - shields, torch.tensor([[0.0, 5.0, 0.0]]).expand(4, 3))


@pytest.mark.parametrize("classes", [2, 3])
def test_margin_shields_are_the_classifiers_log_odds_of_each_class(classes):
    """Checked against the log-odds written from the softmax: log(p_c / (1 - p_c))."""
    torch.manual_seed(0)
    net = build_aegis("resnet18", classes, 1, (32, 32), shield_kind="margin").eval()
    assert not list(net.shields.parameters())
    logits, shields = net(torch.rand(5, 1, 32, 32) * 3)
    p = logits.double().softmax(1)
    torch.testing.assert_close(shields.double(), (p / (1 - p)).log(), rtol=1e-5, atol=1e-5)
    if classes == 2:
        torch.testing.assert_close(shields[:, 0], logits[:, 0] - logits[:, 1])


@pytest.mark.parametrize("kind", ["per_class", "shared_trunk", "margin"])
def test_a_network_describes_its_own_architecture_for_the_manifest(kind):
    net = build_aegis("resnet18", 2, 1, (32, 32), taps=(2, 4), shield_width=8, shield_kind=kind)
    spec = net.architecture()
    width = None if kind == "margin" else 8
    assert (spec.backbone, spec.taps, spec.shield_width, spec.shield_kind) == ("resnet18", (2, 4), width, kind)
    rebuilt = build_aegis(spec.backbone, 2, 1, (32, 32), spec.taps, spec.shield_width, shield_kind=spec.shield_kind)
    rebuilt.load_state_dict(net.state_dict())  # same modules, same names


def test_an_unknown_shield_kind_is_refused():
    with pytest.raises(ValueError, match="shield_kind"):
        build_aegis("resnet18", 2, 1, (32, 32), shield_kind="shared")
