"""Calibrate, evaluate and export a trained AegisNet as a bundle (`models/bundle.py` describes the format).

Weights are stored at half precision (weights.pt as float16, aegis.onnx with float16 initializers cast to float32
once at session start), which keeps the ResNet-18 bundle under 50 MB. The model is rounded to float16 *before*
calibration and evaluation, so the thresholds and every figure belong to exactly the weights that ship.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from models.bundle import (CARD_FILE, ONNX_FILE, WEIGHTS_FILE, ArchitectureSpec, CalibrationSpec, Manifest,
                           write_manifest)
from models.cushion import parse_cushion
from models.imaging import InputSpec
from models.networks import AegisNet
from training.config import TrainConfig
from training.data import CLASSES
from training.metrics import shield_threshold

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


def export_onnx(net: AegisNet, spec: InputSpec, path: Path, rtol: float = 1e-4) -> float:
    """Export `net` with a dynamic batch axis and check ONNX Runtime against torch; returns the max abs diff."""
    import onnxruntime as ort

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


def calibrate(net: AegisNet, x_val: torch.Tensor, labels: np.ndarray, cushion, classes: tuple[str, ...],
              rate: float):
    """Per-class thresholds on clean validation images routed (by prediction) to each Shield."""
    from training.evaluate import predict

    logits, shields = predict(net, x_val, cushion)
    pred = logits.argmax(1)
    thresholds, counts = {}, {}
    for k, name in enumerate(classes):
        routed = shields[pred == k, k]
        if len(routed) == 0:  # no validation image predicted as k: calibrate on those labelled k instead
            log.warning("no validation image is predicted as %s; calibrating its Shield on the %s-labelled ones",
                        name, name)
            routed = shields[labels == k, k]
        counts[name] = int(len(routed))
        thresholds[name] = shield_threshold(routed, rate)
    return thresholds, counts


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _adversarial_training(training: dict) -> str:
    eps = training.get("clf_adv_eps") or 0
    if not eps:
        return ""
    return (f", adversarially (Madry et al.: {training.get('clf_adv_fraction', 0):.0%} of each batch replaced by "
            f"PGD-{training.get('clf_adv_steps')} images at {eps * 256:g}/256 towards the most likely wrong class)")


_BPDA_BACKWARD = {"identity": "an identity backward pass", "diffjpeg": "a differentiable-JPEG backward pass",
                  "mixed": "identity and differentiable-JPEG backward passes on alternate batches"}


def model_card(manifest: Manifest, metrics: dict, command: str) -> str:
    clean = metrics.get("clean", {})
    rows = "\n".join(
        f"| {name} | {r['description']} | {r['attempted']} | {_fmt(r['asr_label'])} | {_fmt(r['auroc'])} | "
        f"{_fmt(r['tpr_at_90tnr'])} | {_fmt(r['rejected_of_successful'])} | {_fmt(r['bypass_rate'])} |"
        for name, r in metrics.get("attacks", {}).items())
    dataset = manifest.data.get("dataset")
    attribution = (
        "Kermany D., Zhang K., Goldbaum M., *Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep "
        "Learning*, Cell 172(5):1122-1131, 2018; data: Mendeley Data doi:10.17632/rscbjbr9sj.2, licence CC BY 4.0. "
        "Images were resized (by their upstream redistributor) to 224 px without preserving aspect, then to 128 px "
        "grayscale PNG for this project." if dataset == "kermany" else
        "APTOS 2019 Blindness Detection (Kaggle competition data: research use only; this bundle must not be "
        "distributed).")
    return f"""# Model card: {manifest.name} {manifest.version}

**Not a medical device.** A research demonstration of adversarial-example detection (Medical Aegis: Yao, He, Zhou,
2021). Its diagnoses must not be used for clinical decisions.

## What it is
- Classifier: `{manifest.architecture.backbone}` (torchvision), classes {list(manifest.classes)}, input
  {manifest.input.channels}x{manifest.input.height}x{manifest.input.width} ({manifest.input.resize}), trained from
  {'scratch' if not manifest.training.get('pretrained') else 'local pretrained weights'}{_adversarial_training(manifest.training)}.
- Cushion: `{parse_cushion(manifest.cushion.model_dump()).describe()}` in front of the classifier.
- Shield: one detector per class on taps {list(manifest.architecture.taps)} ({', '.join(manifest.architecture.tap_names)}),
  width {manifest.architecture.shield_width}, adversarially trained for {manifest.training.get('shield_epochs')}
  epochs against a {manifest.training.get('attack_steps')}-step white-box attacker
  (objective `{manifest.training.get('attack_objective')}`, BPDA through the real Cushion with
  {_BPDA_BACKWARD[manifest.training.get('attack_bpda', 'identity')]}, ε curriculum
  {manifest.training.get('eps_start', 0) * 256:.0f}/256 → {manifest.training.get('eps_end', 0) * 256:.0f}/256).
- Decision: accept iff the Shield logit of the predicted class ≥ its threshold; thresholds
  {json.dumps({k: round(v, 4) for k, v in manifest.thresholds.items()})} reject
  {manifest.calibration.clean_rejection_rate:.0%} of clean {manifest.calibration.split} images per class.

## Intended use
Demonstrating and auditing an adversarial-input detector in front of a chest X-ray classifier; a testbed for attacks.
Out of scope: diagnosis of patients, any image type other than the training data's, adults (the X-rays are
paediatric).

## Data
{attribution}
Splits: validation is patient-disjoint and carved from train; the test split is the dataset's test folder
(Kaggle's split, **not** patient-disjoint from train upstream). Counts: `{json.dumps(manifest.data.get('counts'))}`.
Data fingerprint: `{manifest.data.get('fingerprint')}`.

## Metrics (scale: this bundle, CPU, {clean.get('n', 'n/a')} test images for clean figures)
Clean test: accuracy with Cushion {_fmt(clean.get('accuracy_cushion'))}, ROC AUC {_fmt(clean.get('roc_auc_cushion'))};
without Cushion {_fmt(clean.get('accuracy_no_cushion'))} / {_fmt(clean.get('roc_auc_no_cushion'))};
clean test rejection at the thresholds {_fmt(clean.get('clean_rejection_rate'))}.

Attacks (L∞ ε = 16/256, targeted, BPDA through the Cushion, images quantised to uint8, judged at the thresholds
above; `attempted` = correctly classified test images; AUROC / TPR over successful attacks vs all correctly
classified clean test images):

| attack | what | attempted | label success | AUROC | TPR@90%TNR | rejected of successful | bypass rate |
|---|---|---|---|---|---|---|---|
{rows}

Trained by `{command}`{f"; figures measured by `{metrics['evaluation_command']}`" if metrics.get("evaluation_command") else ""};
re-measure with `python -m training.evaluate --bundle <this folder>`.

## Limits
- White-box attacks with more steps, restarts, differentiable-JPEG BPDA or other objectives may do better than the
  attacks above (see the audit / security report when present). A high AUROC alone hides how many attacks pass at the
  operating point: read the bypass rate.
- Small CPU-scale model (64 px, trained from scratch); label noise in the source data; test split not patient-disjoint.
"""


def finish_bundle(cfg: TrainConfig, net: AegisNet, splits: dict, data_info: dict, history: dict, bundle_dir: Path,
                  evaluate_attacks: bool = True, command: str = "") -> Manifest:
    from training.evaluate import attack_metrics, attack_suite, clean_metrics

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    for stale in bundle_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    net = round_to_half(net.eval())
    classes = CLASSES[cfg.dataset]
    cushion = parse_cushion(cfg.cushion)
    spec = InputSpec(channels=cfg.channels, height=cfg.image_size, width=cfg.image_size)
    thresholds, counts = calibrate(net, splits["val"].tensor(), splits["val"].labels, cushion, classes,
                                   cfg.clean_rejection_rate)
    log.info("thresholds %s on %s validation images", thresholds, counts)
    threshold_array = np.array([thresholds[c] for c in classes])
    x_test, y_test = splits["test"].tensor(), splits["test"].labels
    metrics: dict = {"clean": clean_metrics(net, x_test, y_test, cushion, threshold_array)}
    log.info("clean test: %s", metrics["clean"])
    if evaluate_attacks:
        specs = attack_suite(torch.from_numpy(threshold_array).float(), steps=cfg.eval_steps, kappa=cfg.attack_kappa)
        metrics["attacks"] = attack_metrics(net, x_test, y_test, cushion, threshold_array, specs, cfg.eval_images,
                                            cfg.eval_batch_size, cfg.seed)
        for name, r in metrics["attacks"].items():
            log.info("%s: label success %.3f, AUROC %.3f, rejected of successful %.3f, bypass %.3f", name,
                     r["asr_label"], r["auroc"], r["rejected_of_successful"], r["bypass_rate"])
    metrics["scale"] = (f"{cfg.backbone} at {cfg.image_size} px; {metrics['clean']['n']} test images; attacks on "
                        f"{cfg.eval_images} correctly classified test images")
    metrics["command"] = command
    metrics["history"] = history
    metrics["onnx_max_abs_diff"] = export_onnx(net, spec, bundle_dir / ONNX_FILE)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()},
               bundle_dir / WEIGHTS_FILE)
    manifest = Manifest(
        name=cfg.name, version=cfg.version, classes=classes, input=spec, cushion=cfg.cushion,
        thresholds=thresholds,
        calibration=CalibrationSpec(clean_rejection_rate=cfg.clean_rejection_rate, split="val", counts=counts),
        architecture=ArchitectureSpec(backbone=cfg.backbone, taps=tuple(net.classifier.taps),
                                      tap_names=net.classifier.tap_names, shield_width=cfg.shield_width),
        training=cfg.to_dict(), data=data_info, metrics=metrics)
    (bundle_dir / CARD_FILE).write_text(model_card(manifest, metrics, command), encoding="utf-8")
    manifest = write_manifest(bundle_dir, manifest)
    log.info("bundle written to %s", bundle_dir)
    return manifest
