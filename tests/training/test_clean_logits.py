"""`python -m training.clean_logits`: the distribution that training writes, recomputed from the bundle's ONNX graph
(another runtime than training's torch) on the same validation split, and written into a schema 1.0 bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.bundle import SCHEMA_VERSION, load_bundle
from training import clean_logits


def test_recomputed_from_onnx_equals_what_training_wrote(tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    m = bundle.manifest
    spec = clean_logits.recompute(bundle).spec(m.calibration.clean_rejection_rate, "val")
    assert spec.counts == m.calibration.counts
    for name, written in m.calibration.clean_logits.items():
        again = spec.clean_logits[name]
        np.testing.assert_allclose(again.quantiles, written.quantiles, atol=1e-3)
        assert again.n == written.n


def test_writes_the_distribution_into_an_old_bundle_and_keeps_everything_else(tiny_bundle_dir, tmp_path):
    root = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = "1.0"
    expected = manifest["calibration"].pop("clean_logits")
    path.write_text(json.dumps(manifest))
    before = load_bundle(root).manifest
    assert before.calibration.clean_logits == {}

    assert clean_logits.main(["--bundle", str(root), "--write"]) == 0
    after = load_bundle(root).manifest
    assert after.schema_version == SCHEMA_VERSION
    assert after.thresholds == before.thresholds and after.files["aegis.onnx"] == before.files["aegis.onnx"]
    assert after.files["weights.pt"] == before.files["weights.pt"] and after.metrics == before.metrics
    for name, distribution in after.calibration.clean_logits.items():
        np.testing.assert_allclose(distribution.quantiles, expected[name]["quantiles"], atol=1e-3)


def test_refuses_a_bundle_whose_thresholds_its_graph_does_not_give_back(tiny_bundle_dir, tmp_path):
    root = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["thresholds"]["NORMAL"] += 0.5
    path.write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="NORMAL: threshold"):
        clean_logits.main(["--bundle", str(root)])
