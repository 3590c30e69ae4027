import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.bundle import SCHEMA_VERSION, BundleError, LogitDistribution, Manifest, load_bundle, write_manifest
from models.cushion import JpegCushion
from models.imaging import prepare_image
from models.networks import load_aegis


@pytest.fixture
def bundle_copy(tiny_bundle_dir, tmp_path):
    return shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")


def test_bundle_round_trip(tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    m = bundle.manifest
    assert m.classes == ("NORMAL", "PNEUMONIA")
    assert m.cushion == JpegCushion(quality=80)
    assert set(m.files) == {"aegis.onnx", "weights.pt", "MODEL_CARD.md"}
    assert set(m.thresholds) == set(m.classes)
    assert m.input.height == m.input.width == 32
    assert "Kermany" in bundle.model_card() and "Not a medical device" in bundle.model_card()
    assert m.data["fingerprint"] and m.training["backbone"] == "resnet18"


def test_onnx_matches_torch_on_real_images(tiny_bundle_dir, xray_images):
    bundle = load_bundle(tiny_bundle_dir)
    m = bundle.manifest
    batch = np.stack([bundle.cushion(prepare_image(img, m.input)) for img in xray_images])
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_shields = session.run(["logits", "shield_logits"], {"image": x})
    with torch.no_grad():
        torch_logits, torch_shields = load_aegis(bundle)(torch.from_numpy(x))
    np.testing.assert_allclose(onnx_logits, torch_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx_shields, torch_shields.numpy(), atol=1e-4)
    assert onnx_logits.shape == onnx_shields.shape == (len(xray_images), 2)


def test_onnx_batch_axis_is_dynamic(tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 3, 7):
        logits, shields = session.run(None, {"image": np.random.rand(n, 1, 32, 32).astype(np.float32)})
        assert logits.shape == shields.shape == (n, 2)


def test_tampered_file_is_refused(bundle_copy):
    onnx_path = bundle_copy / "aegis.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[-10] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="aegis.onnx was modified"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "weights.pt").unlink()
    with pytest.raises(BundleError, match="weights.pt is missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("classes"), "schema"),
    (lambda m: m.update(schema_version="2.0"), "unsupported bundle schema version"),
    (lambda m: m["thresholds"].pop("NORMAL"), "thresholds must name exactly the classes"),
    (lambda m: m["cushion"].update(quality=400), "schema"),
    (lambda m: m["files"].pop("MODEL_CARD.md"), "no hash for the required file MODEL_CARD.md"),
    (lambda m: m["files"].update({"../outside": "0" * 64}), "relative"),
])
def test_bad_manifest_is_refused(bundle_copy, edit, message):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)


def test_write_manifest_rehashes_new_files(bundle_copy):
    bundle = load_bundle(bundle_copy)
    (bundle_copy / "security_report.json").write_text('{"verdict": "example"}')
    manifest = bundle.manifest.model_copy(update={"reports": {"security_report": "security_report.json"}})
    write_manifest(bundle_copy, manifest)
    reloaded = load_bundle(bundle_copy)
    assert reloaded.report("security_report") == {"verdict": "example"}
    assert "security_report.json" in reloaded.manifest.files
    assert isinstance(reloaded.manifest, Manifest)


def _as_schema_1_0(bundle_dir):
    """Rewrite a bundle's manifest as a schema 1.0 one (no clean logit distribution), re-hashed."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = "1.0"
    del manifest["calibration"]["clean_logits"]
    path.write_text(json.dumps(manifest))
    return bundle_dir


def test_new_bundles_carry_the_clean_logit_distribution(tiny_bundle_dir):
    m = load_bundle(tiny_bundle_dir).manifest
    assert m.schema_version == SCHEMA_VERSION
    assert set(m.calibration.clean_logits) == set(m.classes)
    for name, distribution in m.calibration.clean_logits.items():
        assert distribution.n == m.calibration.counts[name] == sum(distribution.counts)
        # the threshold is the clean rejection rate's order statistic of these same logits
        assert distribution.quantile(0.0) <= m.thresholds[name] <= distribution.quantile(0.25)


def test_schema_1_0_bundles_still_load(bundle_copy):
    m = load_bundle(_as_schema_1_0(bundle_copy)).manifest
    assert m.schema_version == "1.0" and m.calibration.clean_logits == {}


def test_logit_distribution_matches_numpy():
    values = np.arange(101, dtype=np.float64)  # quantile at level q is 100 q
    d = LogitDistribution.of(values, bins=4)
    assert d.quantile(0.5) == 50 and d.quantile(0.025) == pytest.approx(2.5) and d.quantile(1.0) == 100
    assert d.counts == (25, 25, 25, 26) and d.edges == (0, 25, 50, 75, 100)  # numpy: the last bin is closed
    with pytest.raises(ValueError, match="finite"):
        LogitDistribution.of(np.array([1.0, np.nan]))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(n=d["n"] + 1), "counts summing to n|summarise"),
    (lambda d: d.update(quantiles=list(reversed(d["quantiles"]))), "non-decreasing"),
    (lambda d: d.update(edges=d["edges"][:-1]), "one more than its counts"),
])
def test_bad_clean_logit_distribution_is_refused(bundle_copy, edit, message):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["calibration"]["clean_logits"]["NORMAL"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)
