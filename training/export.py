"""The one module that writes into bundles (`models/bundle.py` describes the format): a new bundle from a trained
AegisNet (`write_bundle`: training, the benchmark bundle), and updates of an existing one (`update_bundle`: figures
re-measured by `training.evaluate --write`, the audit's security report).

Weights are stored at half precision (weights.pt as float16, aegis.onnx with float16 initializers cast to float32
once at session start), which keeps the ResNet-18 bundle under 50 MB. The model is rounded to float16 *before*
calibration and evaluation, so the thresholds and every figure belong to exactly the weights that ship.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from models.bundle import (CARD_FILE, ONNX_FILE, SCHEMA_VERSION, WEIGHTS_FILE, Bundle, CalibrationSpec, Manifest,
                           write_manifest)
from models.imaging import InputSpec
from models.networks import AegisNet

log = logging.getLogger("aegis.export")
OPSET = 17


def round_to_half(net: AegisNet) -> AegisNet:
    """Round every floating parameter and buffer to float16 precision (kept as float32)."""
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return net


def _half_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store large float32 initializers as float16 + a Cast node (folded by ONNX Runtime at session start)."""
    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims) < 1024:
            continue
        array = numpy_helper.to_array(init)
        half = numpy_helper.from_array(array.astype(np.float16), name=f"{init.name}__fp16")
        graph.initializer.remove(init)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{init.name}__cast"))
    for node in reversed(casts):
        graph.node.insert(0, node)
    return model


def float32_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of `_half_initializers`, for outside auditors: every float16 initializer behind a Cast node becomes
    a float32 initializer under the Cast's output name, and the Cast goes. The same function, the same values (float16
    is exact in float32); tools that expect Conv weights as initializers (onnx2torch) then load the graph as is.

        python -m training.export float32 models/default/aegis.onnx aegis-float32.onnx
    """
    graph = model.graph
    halves = {init.name: init for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to != onnx.TensorProto.FLOAT or node.input[0] not in halves:
            continue
        half = halves.pop(node.input[0])
        graph.initializer.remove(half)
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(half).astype(np.float32),
                                                         name=node.output[0]))
        graph.node.remove(node)
    return model


def export_onnx(net: AegisNet, spec: InputSpec, path: Path, rtol: float = 1e-4) -> float:
    """Export `net` with a dynamic batch axis and check ONNX Runtime against torch; returns the max abs diff."""
    import onnxruntime as ort  # local import: loading ONNX Runtime costs start-up time every other command avoids

    net = net.eval()
    dummy = torch.rand(2, spec.channels, spec.height, spec.width)
    buffer = io.BytesIO()
    torch.onnx.export(net, (dummy,), buffer, input_names=["image"], output_names=["logits", "shield_logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "shield_logits": {0: "batch"}},
                      opset_version=OPSET, dynamo=False,
                      do_constant_folding=False)  # keep BatchNorm unfused: initializers stay float16-exact
    model = _half_initializers(onnx.load_from_string(buffer.getvalue()))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.rand(5, spec.channels, spec.height, spec.width)
    with torch.no_grad():
        expected = [t.numpy() for t in net(probe)]
    got = session.run(None, {"image": probe.numpy()})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(expected, got))
    scale = max(1.0, *(float(np.abs(a).max()) for a in expected))
    if diff > rtol * scale:  # float32 kernels differ in summation order; logits of any scale
        raise RuntimeError(f"ONNX export does not match torch: max abs diff {diff} > {rtol} x {scale:.3g}")
    return diff


def write_bundle(bundle_dir: Path, net: AegisNet, manifest: Manifest, card: str, weights: bool = True) -> Manifest:
    """A new bundle in `bundle_dir` (its old files removed): aegis.onnx (checked against torch), weights.pt (float16;
    `weights=False` for benchmark bundles), MODEL_CARD.md = `card`, and the manifest with every file's hash.

    `net` must already be `round_to_half`-ed, so that the figures in `manifest` belong to the weights that ship.
    """
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    for stale in bundle_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    diff = export_onnx(net.eval(), manifest.input, bundle_dir / ONNX_FILE)
    if weights:
        torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()},
                   bundle_dir / WEIGHTS_FILE)
    (bundle_dir / CARD_FILE).write_text(card, encoding="utf-8")
    manifest = manifest.model_copy(update={"metrics": {**manifest.metrics, "onnx_max_abs_diff": diff}})
    manifest = write_manifest(bundle_dir, manifest)
    log.info("bundle written to %s", bundle_dir)
    return manifest


def update_bundle(bundle: Bundle, *, card: str | None = None, metrics: dict | None = None,
                  reports: dict[str, str] | None = None, files: dict[str, bytes] | None = None,
                  calibration: CalibrationSpec | None = None) -> Manifest:
    """Write `files` (name -> content) and the new `card` into an existing bundle, merge `reports` (manifest key ->
    file name), replace `metrics` and `calibration` in its manifest, and re-hash every file. The manifest is
    written at this code's schema version (minor versions only add optional fields)."""
    for name, content in (files or {}).items():
        (bundle.root / name).write_bytes(content)
    if card is not None:
        (bundle.root / CARD_FILE).write_text(card, encoding="utf-8")
    update: dict = {"schema_version": SCHEMA_VERSION}
    if calibration is not None:
        if calibration.counts != bundle.manifest.calibration.counts or \
                calibration.clean_rejection_rate != bundle.manifest.calibration.clean_rejection_rate:
            raise ValueError("a new calibration must keep the bundle's rate and counts (its thresholds stay)")
        update["calibration"] = calibration
    if metrics is not None:
        update["metrics"] = metrics
    if reports:
        update["reports"] = {**bundle.manifest.reports, **reports}
    return write_manifest(bundle.root, bundle.manifest.model_copy(update=update))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export",
                                     description="Bundle graph tools for outside auditors.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("float32", help="write a bundle's aegis.onnx with float32 initializers and no "
                                  "Cast nodes (loadable by onnx2torch; same outputs)")
    convert.add_argument("source", type=Path, help="aegis.onnx, or a bundle folder")
    convert.add_argument("out", type=Path, help="the float32 graph to write")
    args = parser.parse_args(argv)
    source = args.source / ONNX_FILE if args.source.is_dir() else args.source
    model = float32_initializers(onnx.load(source))
    onnx.checker.check_model(model)
    onnx.save(model, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
