"""The untrained benchmark bundle: a valid bundle of the requested architecture, marked as unusable for diagnosis."""

from __future__ import annotations

import numpy as np
import pytest

from models.bundle import load_bundle
from benchmarks.bundle import main


def test_benchmark_bundle_loads_runs_and_says_it_is_untrained(tmp_path):
    import onnxruntime as ort

    assert main(["--backbone", "resnet18", "--size", "32", "--out", str(tmp_path)]) == 0
    bundle = load_bundle(tmp_path)  # schema and hashes verified
    m = bundle.manifest
    assert m.name == "benchmark-resnet18-32" and m.version == "untrained"
    assert (m.input.channels, m.input.height, m.input.width) == (1, 32, 32)
    assert "never use it for diagnosis" in (tmp_path / "MODEL_CARD.md").read_text()
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    logits, shields = session.run(None, {"image": np.zeros((3, 1, 32, 32), np.float32)})
    assert logits.shape == shields.shape == (3, 2)


@pytest.mark.parametrize("kind", ["shared_trunk", "margin"])
def test_other_shield_kinds_export_with_the_same_graph_contract(tmp_path, kind):
    import onnxruntime as ort

    assert main(["--backbone", "resnet18", "--size", "32", "--shield-kind", kind, "--out", str(tmp_path)]) == 0
    bundle = load_bundle(tmp_path)  # export checked ONNX Runtime against torch; schema and hashes verified here
    assert bundle.manifest.architecture.shield_kind == kind
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    logits, shields = session.run(None, {"image": np.zeros((3, 1, 32, 32), np.float32)})
    assert logits.shape == shields.shape == (3, 2)
