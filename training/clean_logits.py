"""Add the clean validation Shield-logit distribution (bundle schema 1.1) to a bundle trained before it existed.

New bundles get it from `training.train` (the calibration step). For an older bundle this recomputes it from the
bundle's own `aegis.onnx` (ONNX Runtime, the graph the service runs) on the patient-disjoint validation split that
its thresholds were calibrated on (`training.data`, from the bundle's training config), checks that these logits
give back the bundle's thresholds and counts, and only then writes the distribution into the manifest
(`training.export.update_bundle`: hashes re-written; weights, graph and thresholds unchanged):

    python -m training.clean_logits --bundle models/default --write
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from models.bundle import Bundle, load_bundle
from training.config import load_config
from training.data import Split, load_data
from training.evaluate import Calibration, calibrate_logits
from training.export import update_bundle

log = logging.getLogger("aegis.clean_logits")


def onnx_outputs(bundle: Bundle, split: Split, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits, Shield logits) of the bundle's graph on the Cushioned images of `split`, by the bundle's rule."""
    import onnxruntime as ort  # local import: only this command needs ONNX Runtime

    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    logits, shields = [], []
    for i in range(0, len(split.images), batch):
        cushioned = np.stack([bundle.cushion(image) for image in split.images[i:i + batch]])
        x = cushioned.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        out = session.run(list(bundle.manifest.onnx.outputs), {bundle.manifest.onnx.input: x})
        logits.append(out[0])
        shields.append(out[1])
    return np.concatenate(logits), np.concatenate(shields)


def recompute(bundle: Bundle, data_dir: str | None = None, tolerance: float = 1e-3) -> Calibration:
    """The bundle's calibration from its own graph on its validation split; refuses one that does not match."""
    m = bundle.manifest
    if m.calibration.split != "val":
        raise SystemExit(f"the bundle was calibrated on {m.calibration.split!r}, not the validation split")
    overrides = {**m.training, **({"data_dir": data_dir} if data_dir else {})}
    splits, info = load_data(load_config(None, overrides), names=("val",))
    if m.data.get("counts", {}).get("val") not in (None, info["counts"]["val"]):
        raise SystemExit(f"validation split {info['counts']['val']} differs from the bundle's "
                         f"{m.data['counts']['val']}: other data or another split")
    logits, shields = onnx_outputs(bundle, splits["val"])
    calibration = calibrate_logits(logits, shields, splits["val"].labels, m.classes,
                                   m.calibration.clean_rejection_rate)
    if calibration.counts != m.calibration.counts:
        raise SystemExit(f"routed counts {calibration.counts} differ from the bundle's {m.calibration.counts}")
    for name, threshold in calibration.thresholds.items():
        if abs(threshold - m.thresholds[name]) > tolerance:
            raise SystemExit(f"{name}: threshold {threshold:.6f} from the graph differs from the bundle's "
                             f"{m.thresholds[name]:.6f} by more than {tolerance}")
    return calibration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the embedded one)")
    parser.add_argument("--data-dir", help="dataset folder (default: the data_dir of the bundle's training config, "
                                           "else $AEGIS_DATA_DIR or ../shared/data)")
    parser.add_argument("--write", action="store_true", help="store the distribution in the bundle and re-hash it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    calibration = recompute(bundle, args.data_dir)
    spec = calibration.spec(m.calibration.clean_rejection_rate, m.calibration.split)
    summary = {name: {"n": d.n, "threshold_recomputed": calibration.thresholds[name],
                      "threshold_bundle": m.thresholds[name], "median": d.quantile(0.5)}
               for name, d in spec.clean_logits.items()}
    print(json.dumps(summary, indent=2))
    if args.write:
        update_bundle(bundle, calibration=spec)
        log.info("wrote calibration.clean_logits into %s", bundle.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
