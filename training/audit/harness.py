"""The shared machinery of the tables: data, clean predictions, attacked sets, Shield scores and result rows."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.cushion import CushionBase
from models.imaging import InputSpec
from training.audit.attacks import Attack, run_attack, targets_for
from training.config import dataset_dir
from training.data import load_records, load_split
from training.inference import predict
from training.metrics import bootstrap_ci, detection_summary, routed_scores

log = logging.getLogger("aegis.audit")


@dataclass
class AuditData:
    dataset: str
    data_dir: Path
    x_train: Tensor  # float N x C x H x W in [0, 1], a seeded subset of the train split
    y_train: np.ndarray
    x_test: Tensor
    y_test: np.ndarray

    def describe(self) -> dict:
        return {"dataset": self.dataset, "data_dir": str(self.data_dir), "train_images": len(self.y_train),
                "test_images": len(self.y_test)}


def load_audit_data(dataset: str, data_dir: str | Path | None, spec: InputSpec, train_images: int,
                    test_images: int = 0, seed: int = 0) -> AuditData:
    """Seeded subsets of the train split (detector fitting) and the test split (evaluation; 0 = all of it)."""
    root = dataset_dir(dataset, data_dir)
    records = load_records(dataset, root)
    rng = np.random.default_rng(seed)

    def take(split: str, n: int):
        chosen = [r for r in records if r.split == split]
        if n:
            chosen = [chosen[i] for i in sorted(rng.permutation(len(chosen))[:n])]
        split = load_split(chosen, spec)
        return split.tensor(), split.labels

    return AuditData(dataset, root, *take("train", train_images), *take("test", test_images))


@dataclass
class AttackedSet:
    """Correctly classified images, their targets and adversarial versions (uint8 levels) for one attack."""

    index: np.ndarray  # into the source images
    targets: np.ndarray
    x_adv: Tensor
    max_linf: float


def correct_subset(pred: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    correct = np.flatnonzero(pred == labels)
    return np.sort(np.random.default_rng(seed).permutation(correct)[:n])


def attack_set(net, attack: Attack, x: Tensor, labels: np.ndarray, index: np.ndarray, cushion: CushionBase, batch: int,
               seed: int) -> AttackedSet:
    targets = targets_for(torch.from_numpy(labels[index]), net.classifier.head[-1].out_features, seed)
    x_adv = run_attack(net, attack, x[index], targets, cushion, batch, seed)
    linf = float((x_adv - x[index]).abs().max()) if len(index) else 0.0
    if attack.spec.norm == "linf" and linf > attack.spec.eps + 1e-6:  # never report a broken budget
        raise AssertionError(f"{attack.spec.name}: L∞ {linf} exceeds eps {attack.spec.eps}")
    return AttackedSet(index, targets.numpy(), x_adv, linf)


class AttackCache:
    """Finished attacked sets (and the ceiling) kept in a folder, so that a long audit resumes where it stopped (the
    release-scale report runs for hours on two cores) and subsets of its attacks can run in separate processes. An
    entry is reused only for the same network (weights and buffers), thresholds, Cushion, images, attack (row name,
    description, budget, steps), batch and seed, and for a transfer attack the same substitute: anything else is
    attacked afresh."""

    def __init__(self, root: str | Path, net: torch.nn.Module, *, thresholds: np.ndarray,
                 substitute: torch.nn.Module | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = _weights_digest(net, np.asarray(thresholds, dtype=np.float64).tobytes())
        # only the transfer rows depend on the substitute: the white-box rows are shared with runs without one
        self.substitute_fingerprint = None if substitute is None else _weights_digest(substitute)

    def _path(self, name: str, parts: tuple, *arrays: np.ndarray, suffix: str) -> Path:
        key = hashlib.sha256(repr(parts).encode())
        for array in arrays:
            key.update(np.ascontiguousarray(array).tobytes())
        return self.root / f"{name}-{key.hexdigest()[:20]}{suffix}"

    def attack_set(self, name: str, net, attack: Attack, x: Tensor, labels: np.ndarray, index: np.ndarray,
                   cushion: CushionBase, batch: int, seed: int) -> AttackedSet:
        spec = attack.spec
        source = self.substitute_fingerprint if attack.kind == "transfer" else None
        path = self._path(name, (self.fingerprint, source, name, spec.description, spec.eps, spec.steps, spec.norm,
                                 attack.sees_shield, repr(cushion), batch, seed),
                          x[index].numpy(), np.asarray(labels)[index], suffix=".pt")
        if path.exists():
            saved = torch.load(path)
            log.info("%s: attacked images reused from %s", name, path)
            x_adv = saved["x_adv"]
            return AttackedSet(saved["index"].numpy(), saved["targets"].numpy(),
                               x_adv.float() / 255 if x_adv.dtype == torch.uint8 else x_adv, saved["max_linf"])
        attacked = attack_set(net, attack, x, labels, index, cushion, batch, seed)
        levels = torch.round(attacked.x_adv * 255)
        exact = torch.equal(levels / 255, attacked.x_adv)  # uint8 levels (every engine attack): a quarter the size
        _save_atomically(path, lambda partial: torch.save(
            {"index": torch.from_numpy(attacked.index), "targets": torch.from_numpy(attacked.targets),
             "x_adv": levels.to(torch.uint8) if exact else attacked.x_adv, "max_linf": attacked.max_linf}, partial))
        return attacked

    def ceiling(self, measure, classifier: torch.nn.Module, x: Tensor, y: np.ndarray, cushion: CushionBase,
                *settings) -> dict:
        """`measure(classifier, x, y, cushion, *settings)` (the robustness ceiling, a JSON-able dict), kept like an
        attacked set: it costs as much as several report rows. Keyed on what it measures (the classifier's weights,
        not the thresholds), the Cushion, the clean images and the settings."""
        path = self._path("ceiling", (_weights_digest(classifier), repr(cushion), settings), x.numpy(), np.asarray(y),
                          suffix=".json")
        if path.exists():
            log.info("ceiling reused from %s", path)
            return json.loads(path.read_text())
        result = measure(classifier, x, y, cushion, *settings)
        _save_atomically(path, lambda partial: partial.write_text(json.dumps(result)))
        return result


def _weights_digest(module: torch.nn.Module, *extra: bytes) -> str:
    digest = hashlib.sha256(b"".join(extra))
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_atomically(path: Path, write) -> None:
    partial = path.with_suffix(".partial")
    write(partial)
    os.replace(partial, path)  # a run interrupted while saving computes the entry again, never half-reads it


def judge(net, attacked: AttackedSet, cushion: CushionBase, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per attacked image: did it reach its target, and its threshold-relative Shield score (> 0: rejected), routed
    by the pipeline's prediction as in deployment."""
    adv_logits, adv_shields = predict(net, attacked.x_adv, cushion)
    adv_pred = adv_logits.argmax(1)
    return adv_pred == attacked.targets, routed_scores(adv_shields, adv_pred, thresholds)


def bypassed(judged: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per attacked image, from `judge`: reached the target and accepted (the end-to-end success)."""
    reached, scores = judged
    return reached & (scores <= 0)


def share(key: str, hit: np.ndarray, n_resamples: int, seed: int) -> dict:
    """{key: share of True in `hit`, key_ci95: its percentile bootstrap interval} (NaN for no images)."""
    hit = np.asarray(hit, dtype=float)
    if not len(hit):
        return {key: float("nan"), f"{key}_ci95": [float("nan"), float("nan")]}
    return {key: float(hit.mean()),
            f"{key}_ci95": list(bootstrap_ci(np.mean, hit, n_resamples=max(n_resamples, 100), seed=seed))}


def shield_row(net, clean_x: Tensor, clean_y: np.ndarray, attacked: AttackedSet, cushion: CushionBase, thresholds: np.ndarray,
               n_resamples: int, seed: int, judge_bypass: bool,
               judged: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Figures of the Shield (with or without Cushion) against one attacked set, and its ROC inputs.

    Scores are threshold-relative (`routed_scores`) and routed by the pipeline's *prediction*, as in deployment.
    `judge_bypass`: also report the bypass rate at the bundle's own thresholds (only meaningful for the
    configuration they were calibrated for). `judged`: `judge`'s answer for `attacked`, when the caller has it.
    """
    logits, shields = predict(net, clean_x, cushion)
    pred = logits.argmax(1)
    correct = pred == clean_y
    clean_scores = routed_scores(shields[correct], pred[correct], thresholds)
    judged = judged or judge(net, attacked, cushion, thresholds)
    reached, adv_scores = judged
    row = detection_summary(clean_scores, adv_scores, reached, n_resamples, seed)
    row["max_linf"] = attacked.max_linf
    if judge_bypass:
        row.update(share("bypass_rate", bypassed(judged), n_resamples, seed))
        row["clean_rejection_rate"] = float(np.mean(clean_scores > 0))
    return row, (clean_scores, adv_scores[reached])
