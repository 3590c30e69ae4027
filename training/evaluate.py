"""Evaluate a defended model: clean accuracy with and without the Cushion, and the attack suite of the bundle's
acceptance (PGD-20 that ignores the Shield; WB-100, WB_d-100 and selective PGD-100 that attack it), all with BPDA
through the real Cushion, on uint8-quantised adversarial images, at the bundle's own thresholds.

It also calibrates the thresholds (`calibrate`: on clean validation images, never on test).

Re-evaluate an existing bundle (the figures in its model card come from this):

    python -m training.evaluate --bundle models/default --images 150

Per attack it reports, over `attempted` = correctly classified test images (`attacks-reference.md` §5.5):
`asr_label` (reach the target class), `auroc` and `tpr_at_90tnr` / `tpr_at_95tnr` (clean = every correctly classified
test image, adversarial = the attacks that reached their target; score = how far the routed class's Shield logit
falls below that class's threshold, so that the Shields of different classes share one scale),
`rejected_of_successful` (share of label-successful attacks the thresholds reject) and `bypass_rate`
(reach the target AND accepted, over attempted: the end-to-end security figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from models.bundle import CalibrationSpec, LogitDistribution, load_bundle
from models.cushion import CushionBase
from models.networks import AegisNet, load_aegis
from training.attacks import AttackSpec, build_attack
from training.config import dataset_dir
from training.data import CLASSES, load_records, load_split
from training.export import update_bundle
from training.inference import predict
from training.metrics import auroc, realised_tnr, routed_clean_logits, routed_scores, shield_threshold, tpr_at_tnr
from training.model_card import model_card

log = logging.getLogger("aegis.evaluate")

EPS = 16 / 256


def attack_suite(thresholds: Tensor, steps: int = 100, kappa: float = 10.0, eps: float = EPS) -> list[AttackSpec]:
    """The acceptance suite at budget `eps` (the paper's 16/256 by default), from the attack library (adaptive
    attacks: step eps/8 = 2/256 at 16/256, reference §11)."""
    def named(name: str, spec: AttackSpec) -> AttackSpec:
        return replace(spec, name=name)

    return [
        # No thresholds: this attacker ignores the Shield, also when it picks its best iterate.
        named("pgd20", build_attack("pgd_linf", eps=eps, steps=20)),
        named(f"wb{steps}", build_attack("wb", eps=eps, steps=steps, thresholds=thresholds, kappa=kappa)),
        named(f"wbd{steps}", build_attack("wbd", eps=eps, steps=steps, thresholds=thresholds, kappa=kappa)),
        named(f"spgd{steps}", build_attack("spgd", eps=eps, steps=steps, thresholds=thresholds, kappa=kappa)),
    ]


@dataclass(frozen=True)
class Calibration:
    """Per-class thresholds, and the clean logits routed to each Shield that they were calibrated on."""

    thresholds: dict[str, float]
    clean_logits: dict[str, np.ndarray]

    @property
    def counts(self) -> dict[str, int]:
        return {name: int(len(values)) for name, values in self.clean_logits.items()}

    def spec(self, rate: float, split: str) -> CalibrationSpec:
        """The bundle's calibration section, with each class's clean logit distribution (schema 1.1)."""
        return CalibrationSpec(clean_rejection_rate=rate, split=split, counts=self.counts,
                               clean_logits={k: LogitDistribution.of(v) for k, v in self.clean_logits.items()})


def calibrate_logits(logits: np.ndarray, shields: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                     rate: float) -> Calibration:
    """Thresholds from the clean validation outputs of any runtime (torch here, ONNX Runtime in
    `training.clean_logits`)."""
    routed = routed_clean_logits(logits, shields, labels, classes)
    return Calibration({name: shield_threshold(values, rate) for name, values in routed.items()}, routed)


def calibrate(net: AegisNet, x_val: Tensor, labels: np.ndarray, cushion: CushionBase, classes: tuple[str, ...],
              rate: float) -> Calibration:
    """Per-class thresholds on clean validation images routed (by prediction) to each Shield."""
    logits, shields = predict(net, x_val, cushion)
    return calibrate_logits(logits, shields, labels, classes, rate)


def clean_metrics(net: AegisNet, x: Tensor, labels: np.ndarray, cushion: CushionBase, thresholds: np.ndarray) -> dict:
    out = {}
    for name, c in (("cushion", cushion), ("no_cushion", None)):
        logits, shields = predict(net, x, c)
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        pred = logits.argmax(1)
        out[f"accuracy_{name}"] = float((pred == labels).mean())
        if logits.shape[1] == 2:
            out[f"roc_auc_{name}"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            out[f"roc_auc_{name}"] = float(roc_auc_score(labels, probs, multi_class="ovr"))
        if name == "cushion":
            accepted = shields[np.arange(len(pred)), pred] >= thresholds[pred]
            out["clean_rejection_rate"] = float(1 - accepted.mean())
            out["accuracy_of_accepted"] = float((pred == labels)[accepted].mean())
    out["cushion_accuracy_cost"] = out["accuracy_no_cushion"] - out["accuracy_cushion"]
    out["n"] = int(len(labels))
    return out


def attack_metrics(net: AegisNet, x: Tensor, labels: np.ndarray, cushion: CushionBase, thresholds: np.ndarray,
                   specs: list[AttackSpec], images: int, batch: int = 50, seed: int = 0) -> dict:
    """Run each attack on up to `images` correctly classified test images; returns per-attack figures."""
    logits, shields = predict(net, x, cushion)
    pred = logits.argmax(1)
    correct = np.flatnonzero(pred == labels)
    clean_scores = routed_scores(shields[correct], pred[correct], thresholds)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(correct)[:images])
    num_classes = logits.shape[1]
    targets = (labels[chosen] + rng.integers(1, num_classes, len(chosen))) % num_classes
    results = {}
    for spec in specs:
        torch.manual_seed(seed)
        adv_images = []
        for i in range(0, len(chosen), batch):
            idx = chosen[i:i + batch]
            result = spec(net, x[idx], torch.from_numpy(targets[i:i + batch]), cushion)
            adv_images.append(result.x_adv)
        adv = torch.cat(adv_images)
        linf = float((adv - x[chosen]).abs().flatten(1).max(1).values.max())
        adv_logits, adv_shields = predict(net, adv, cushion)  # re-judged from the returned uint8 images
        reached = adv_logits.argmax(1) == targets
        adv_scores = routed_scores(adv_shields, targets, thresholds)
        accepted = adv_scores <= 0
        successful_scores = adv_scores[reached]
        results[spec.name] = {
            "description": spec.description,
            "eps": spec.eps, "norm": spec.norm, "steps": spec.steps, "max_linf": linf,
            "max_l2": float((adv - x[chosen]).flatten(1).norm(dim=1).max()),
            "attempted": int(len(chosen)), "asr_label": float(reached.mean()),
            "auroc": auroc(clean_scores, successful_scores),
            "tpr_at_90tnr": tpr_at_tnr(clean_scores, successful_scores, 0.90),
            "tnr_realised_90": realised_tnr(clean_scores, successful_scores, 0.90),
            "tpr_at_95tnr": tpr_at_tnr(clean_scores, successful_scores, 0.95),
            "tnr_realised_95": realised_tnr(clean_scores, successful_scores, 0.95),
            "rejected_of_successful": float(1 - accepted[reached].mean()) if reached.any() else float("nan"),
            "bypass_rate": float((reached & accepted).mean()),
            "n_clean": int(len(clean_scores)),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the embedded one)")
    parser.add_argument("--data-dir", type=Path, help="dataset folder (default: the bundle's training data path)")
    parser.add_argument("--images", type=int, default=150, help="test images attacked per attack")
    parser.add_argument("--steps", type=int, default=100, help="steps of the adaptive attacks")
    parser.add_argument("--attacks", default="all", help="comma-separated names from the suite, or all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--write", action="store_true",
                        help="store the figures in the bundle (manifest metrics + model card) and re-hash it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    dataset = m.data.get("dataset", "kermany")
    records = [r for r in load_records(dataset, dataset_dir(dataset, args.data_dir)) if r.split == "test"]
    if tuple(CLASSES[dataset]) != tuple(m.classes):
        raise SystemExit(f"bundle classes {m.classes} do not match dataset {dataset} classes {CLASSES[dataset]}")
    test = load_split(records, m.input)
    x, labels = test.tensor(), test.labels
    net = load_aegis(bundle)
    thresholds = m.threshold_array()
    specs = attack_suite(torch.from_numpy(thresholds).float(), steps=args.steps)
    if args.attacks != "all":
        wanted = set(args.attacks.split(","))
        specs = [s for s in specs if s.name in wanted]
    report = {"clean": clean_metrics(net, x, labels, bundle.cushion, thresholds),
              "attacks": attack_metrics(net, x, labels, bundle.cushion, thresholds, specs, args.images)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.write:
        command = shlex.join(["python", "-m", "training.evaluate", *(sys.argv[1:] if argv is None else argv)])
        metrics = {**m.metrics, **report, "evaluation_command": command}
        card = model_card(m.model_copy(update={"metrics": metrics}), metrics, metrics.get("command", ""))
        update_bundle(bundle, card=card, metrics=metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
