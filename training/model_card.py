"""The model card of a bundle (MODEL_CARD.md): intended use, data and attribution, figures with their scale and
command, limits; rendered from the manifest so that card and manifest cannot disagree."""

from __future__ import annotations

import json

import numpy as np

from models.bundle import Manifest


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _adversarial_training(training: dict) -> str:
    eps = training.get("clf_adv_eps") or 0
    if not eps:
        return ""
    attack = f"PGD-{training.get('clf_adv_steps')} at {eps * 256:g}/256 on the whole batch"
    if training.get("clf_objective") == "trades":
        return f", adversarially with TRADES (Zhang et al. 2019, beta {training.get('clf_beta')}; {attack})"
    if training.get("clf_objective") == "mart":
        return f", adversarially with MART (Wang et al. 2020, beta {training.get('clf_beta')}; {attack})"
    return (f", adversarially (Madry et al.: {training.get('clf_adv_fraction', 0):.0%} of each batch replaced by "
            f"PGD-{training.get('clf_adv_steps')} images at {eps * 256:g}/256 towards the most likely wrong class)")


def _joint_stage(training: dict) -> str:
    if not training.get("joint_epochs"):
        return ""
    return (f"- Then classifier and Shields fine-tuned together for {training['joint_epochs']} epochs against the same "
            "attacker, each attack to be classified correctly or rejected (reject as class N+1), clean accuracy "
            "held by a clean term.\n")


_SHIELD_KIND = {"per_class": "", "shared_trunk": " (one shared tap trunk, a head per class)",
                "margin": " (no weights: the classifier's own log-odds of the class, rejection by confidence)"}
_EPS_SCHEDULE = {"curriculum": "", "uniform": ", then each batch's budget drawn uniformly from those grey levels"}
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
- Cushion: `{manifest.cushion.describe()}` in front of the classifier.
- Shield: one detector per class{_SHIELD_KIND[manifest.architecture.shield_kind]} on taps {list(manifest.architecture.taps)} ({', '.join(manifest.architecture.tap_names)}),
  width {manifest.architecture.shield_width}, adversarially trained for {manifest.training.get('shield_epochs')}
  epochs against a {manifest.training.get('attack_steps')}-step white-box attacker
  (objective `{manifest.training.get('attack_objective')}`, BPDA through the real Cushion with
  {_BPDA_BACKWARD[manifest.training.get('attack_bpda', 'identity')]}, ε curriculum
  {manifest.training.get('eps_start', 0) * 256:.0f}/256 → {manifest.training.get('eps_end', 0) * 256:.0f}/256{_EPS_SCHEDULE[manifest.training.get('eps_schedule', 'curriculum')]}).
{_joint_stage(manifest.training)}- Decision: accept iff the Shield logit of the predicted class ≥ its threshold; thresholds
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
