"""The embedded default bundle: integrity, size, parity, and its quality re-measured on real data."""

import numpy as np
import onnx
import onnx2torch
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from models.imaging import prepare_image
from models.networks import load_aegis
from training.data import load_images, load_records
from training.export import main as export_main


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()  # None = the embedded default


@pytest.fixture(scope="module")
def test_split(bundle, kermany_dir):
    records = [r for r in load_records("kermany", kermany_dir) if r.split == "test"]
    x = load_images(records, bundle.manifest.input)
    cushioned = np.stack([bundle.cushion(img) for img in x]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    return cushioned, np.array([r.label for r in records]), x


def test_default_bundle_is_complete_and_small(bundle):
    m = bundle.manifest
    assert m.classes == ("NORMAL", "PNEUMONIA")
    assert m.cushion.kind == "jpeg" and m.cushion.quality == 80
    assert set(m.files) >= {"aegis.onnx", "weights.pt", "MODEL_CARD.md"}
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE_DIR.iterdir() if p.is_file())
    assert size <= 50 * 2**20
    for attack in ("pgd20", "wb100", "wbd100", "spgd100"):
        assert attack in m.metrics["attacks"]
    # python -m training.clean_logits --write: the validation images its thresholds were calibrated on
    assert {k: d.n for k, d in m.calibration.clean_logits.items()} == m.calibration.counts == \
        {"NORMAL": 212, "PNEUMONIA": 438}


def test_default_bundle_onnx_matches_its_torch_weights(bundle):
    images = [np.asarray(Image.open(p)) for p in sorted((DEFAULT_BUNDLE_DIR.parents[1] / "samples").glob("*.png"))]
    batch = np.stack([bundle.cushion(prepare_image(img, bundle.manifest.input)) for img in images])
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    logits, shields = session.run(None, {"image": x})
    with torch.no_grad():
        torch_logits, torch_shields = load_aegis(bundle)(torch.from_numpy(x))
    np.testing.assert_allclose(logits, torch_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(shields, torch_shields.numpy(), atol=1e-4)


def test_default_bundle_quality_on_the_kermany_test_split(bundle, test_split):
    """Re-measured with ONNX Runtime only (the serving path), and equal to what the manifest claims."""
    x, labels, _ = test_split
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    logits, shields = session.run(None, {"image": x})
    pred = logits.argmax(1)
    accuracy = float((pred == labels).mean())
    clean = bundle.manifest.metrics["clean"]
    assert accuracy == pytest.approx(clean["accuracy_cushion"], abs=0.005)
    assert accuracy >= 0.87
    thresholds = np.array([bundle.manifest.thresholds[c] for c in bundle.manifest.classes])
    rejected = shields[np.arange(len(pred)), pred] < thresholds[pred]
    assert rejected.mean() < 0.15  # calibrated for 5% on validation; the test folder is shifted


def test_default_bundle_pgd_figure_in_its_manifest_is_reproducible(bundle, test_split):
    """PGD-20 that ignores the Shield, re-run on other test images: the share of successful attacks the Shield
    rejects agrees with the manifest's figure (measured on 150 images) within sampling noise."""
    from training.attacks import Objective, PGDConfig, pgd
    from training.inference import predict

    _, labels, x_uint8 = test_split
    net = load_aegis(bundle)
    pick = np.random.default_rng(1).permutation(len(labels))[:80]  # both classes, as in the manifest's sample
    x = torch.from_numpy(x_uint8[pick]).permute(0, 3, 1, 2).float() / 255
    y = labels[pick]
    logits, _ = predict(net, x, bundle.cushion)
    keep = logits.argmax(1) == y
    x, target = x[keep], torch.from_numpy(1 - y[keep])
    torch.manual_seed(0)
    adv = pgd(net, x, target, Objective(), PGDConfig(eps=16 / 256, steps=20), cushion=bundle.cushion).x_adv
    assert (adv - x).abs().max() <= 16 / 256 + 1e-6
    adv_logits, adv_shields = predict(net, adv, bundle.cushion)
    reached = adv_logits.argmax(1) == target.numpy()
    thresholds = np.array([bundle.manifest.thresholds[c] for c in bundle.manifest.classes])
    accepted = adv_shields[np.arange(len(target)), target.numpy()] >= thresholds[target.numpy()]
    claimed = bundle.manifest.metrics["attacks"]["pgd20"]["rejected_of_successful"]
    measured = float((~accepted[reached]).mean())
    n = int(reached.sum())
    assert n >= 30, "too few successful attacks to compare"  # an adversarially trained classifier resists some
    assert abs(measured - claimed) <= 3 * np.sqrt(max(claimed * (1 - claimed), 0.05) / n) + 0.02, (measured, claimed)


def test_the_float32_graph_loads_in_onnx2torch_and_gives_the_bundles_answers(bundle, test_split, tmp_path):
    """Outside auditors attack the graph with their own tools: the shipped conversion (float16 initializers behind
    Cast nodes -> float32 initializers) must load in onnx2torch and give ONNX Runtime's answers, with gradients."""
    out = tmp_path / "aegis-float32.onnx"
    assert export_main(["float32", str(DEFAULT_BUNDLE_DIR), str(out)]) == 0
    graph = onnx.load(out).graph
    assert not [n for n in graph.node if n.op_type == "Cast"]
    assert {i.data_type for i in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    x = test_split[0][:16]
    shipped = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    converted = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    for a, b in zip(shipped, converted):
        np.testing.assert_array_equal(a, b)  # float16 values are exact in float32: the same graph
    model = onnx2torch.convert(str(out)).eval()
    image = torch.from_numpy(x).requires_grad_()
    logits, shields = model(image)
    np.testing.assert_allclose(logits.detach().numpy(), shipped[0], atol=1e-4)
    np.testing.assert_allclose(shields.detach().numpy(), shipped[1], atol=1e-4)
    shields.sum().backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
