"""The security report of a bundle: the acceptance-relevant attacks with intervals, an eps and steps sweep for the
sanity flags, ROC curves; written into the bundle and listed in `manifest.reports` (hashes re-written).

Files: `security_report.json` (key `security_report`, served at GET /v1/model), `security_report.md`
(key `security_report_md`) and `security_report_roc.png` (hashed in `manifest.files`, named in the JSON).
"""

from __future__ import annotations

import logging

import torch

from training.audit.attacks import Attack, describe, make_attack
from training.audit.checks import Trial
from training.audit.harness import attack_set, correct_subset, shield_row
from training.audit.tables import Context
from training.evaluate import attack_suite, clean_metrics, predict

log = logging.getLogger("aegis.audit")
REPORT_KEYS = {"security_report": "security_report.json", "security_report_md": "security_report.md"}
REPORT_EXTRA_ATTACKS = ("opgd", "apgd_wb", "wb_diffjpeg", "wb_eot")
REPORT_COLUMNS = [("attack", "attack"), ("eps_256", "ε (/256)"), ("steps", "steps"), ("attempted", "n"),
                  ("asr_label", "label ASR"), ("auroc", "AUROC"), ("tpr_at_90tnr", "TPR@90%TNR"),
                  ("tpr_at_95tnr", "TPR@95%TNR"), ("sr_at_5fpr", "SR@5%FPR"), ("bypass_rate", "bypass@τ")]


def security_report(ctx: Context) -> dict:
    x, y = ctx.clean_test()
    cushion, thresholds = ctx.cushion, ctx.thresholds
    thresholds_t = torch.from_numpy(thresholds).float()
    s = ctx.scale
    kappa = ctx.manifest.training.get("attack_kappa", 10.0)
    pred = predict(ctx.net, x, cushion)[0].argmax(1)
    index = correct_subset(pred, y, s.eval_images, ctx.seed)
    # The acceptance suite (training.evaluate), then the sanity sweeps of WB: eps at fixed steps, half the steps.
    runs: list[tuple[str, Attack]] = [
        (spec.name, describe(spec)) for spec in attack_suite(thresholds_t, steps=s.adaptive_steps, kappa=kappa)]
    # Stronger than the paper (`attacks-reference.md` §3.8): other directions, APGD, a differentiable-JPEG backward
    # pass, EOT; all at the paper's budget and the scale's steps.
    for name in REPORT_EXTRA_ATTACKS:
        runs.append((f"{name}{s.adaptive_steps}",
                     make_attack(name, eps=16 / 256, steps=s.adaptive_steps, thresholds=thresholds_t, kappa=kappa)))
    for eps in s.eps_sweep:
        if eps != 16 / 256:
            runs.append((f"wb{s.adaptive_steps}@{eps * 256:g}",
                         make_attack("wb", eps=eps, steps=s.adaptive_steps, thresholds=thresholds_t, kappa=kappa)))
    half = max(1, s.adaptive_steps // 2)
    runs.append((f"wb{half}", make_attack("wb", eps=16 / 256, steps=half, thresholds=thresholds_t, kappa=kappa)))
    rows, trials = [], []
    for name, attack in runs:
        log.info("security report: %s on %d images", name, len(index))
        attacked = attack_set(ctx.net, attack, x, y, index, cushion, s.batch, ctx.seed)
        row, curve = shield_row(ctx.net, x, y, attacked, cushion, thresholds, s.bootstrap, ctx.seed, True)
        cfg = attack.spec
        rows.append({"attack": name, "description": cfg.description, "eps": cfg.eps, "eps_256": cfg.eps * 256,
                     "steps": cfg.steps, "status": "ok", **row})
        if cfg.eps == 16 / 256:
            ctx.curves[name] = curve
        family = attack.family
        success = row["bypass_rate"] if attack.sees_shield else row["asr_label"]  # what the attack optimises
        trials.append(Trial(name, family, cfg.eps, cfg.steps, success, row["attempted"], attack.kind))
    notes = [
        "Attacks: targeted, L∞, through the bundle's real Cushion with BPDA (identity backward), quantised to uint8, "
        "judged at the bundle's thresholds. attempted = correctly classified clean test images.",
        "bypass@τ = reach the target AND accepted at the bundle's thresholds, over attempted: the end-to-end figure. "
        "SR@5% = the same at a threshold set to 5% FPR on the clean test images (Bryniarski et al. 2022).",
        "Sanity flags use bypass@τ. Beyond the paper: orthogonal PGD, APGD, BPDA through a differentiable JPEG and "
        "EOT. Still stronger evaluations (more steps and restarts, feature and HFC attacks: Tables 2 and 4) may do "
        "better; a high AUROC is a reason for more attacks, not a result.",
    ]
    result = ctx.result("report", f"Security report: {ctx.manifest.name} {ctx.manifest.version}", rows, notes, trials)
    result["clean"] = clean_metrics(ctx.net, x, y, cushion, thresholds)
    return result


def write_into_bundle(bundle, result: dict) -> list:
    """Write the report files into the bundle folder and re-write the manifest (reports + every file's hash)."""
    from models.bundle import write_manifest
    from training.audit.outputs import write_result

    curves = result.pop("_curves", None)
    written = write_result(result, bundle.root, "security_report", REPORT_COLUMNS, curves)
    manifest = bundle.manifest.model_copy(update={"reports": {**bundle.manifest.reports, **REPORT_KEYS}})
    write_manifest(bundle.root, manifest)
    return written


def summary_line(result: dict) -> str:
    best = max((r for r in result["rows"] if r.get("eps") == 16 / 256), key=lambda r: r.get("bypass_rate", 0))
    return (f"strongest at 16/256: {best['attack']} bypass {best['bypass_rate']:.3f}, SR@5% {best['sr_at_5fpr']:.3f}; "
            f"{len(result['sanity_flags'])} sanity flag(s)")

