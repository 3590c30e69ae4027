"""Is a randomised Cushion worth shipping? (Defence 3.0, issue 15 item 5.)

The same bundle, its fixed Cushion against `RandomisedJpegCushion` (JPEG quality and block-grid offset drawn per
image), judged the only fair way: the randomised Cushion gets thresholds re-calibrated under its own draws at the
bundle's clean rejection rate on the bundle's validation split, and faces an EOT attack over the same distribution
(`wb_eot_cushion`: every forward an exact draw, every backward a differentiable JPEG drawn alike). An attacked image
is judged under fresh draws, once (one request) and over `tries` requests (an attacker may resubmit; with the
draw keyed to the request, any one-level change of one pixel re-draws). The fixed Cushion faces the same attack
names on the same images; its rows are deterministic, so one try is all tries.

    python -m training.audit randomised --bundle runs/x/bundle --scale cpu --out results/kermany/randomised
"""

from __future__ import annotations

import logging
from dataclasses import fields

import numpy as np
import torch

from models.bundle import threshold_array
from models.cushion import CushionBase, RandomisedJpegCushion
from training.audit.attacks import make_attack
from training.audit.harness import attack_set, bypassed, correct_subset, judge, share
from training.audit.tables import Context
from training.config import TrainConfig, load_config
from training.data import load_data
from training.evaluate import calibrate, clean_metrics
from training.inference import predict

log = logging.getLogger("aegis.audit")
STUDY_ATTACKS = ("wb_diffjpeg", "wb_eot_cushion")
STUDY_COLUMNS = [("cushion", "Cushion"), ("attack", "attack"), ("eps_256", "ε (/256)"), ("attempted", "n"),
                 ("bypass_rate", "bypass, 1 request"), ("bypass_rate_tries", "bypass, any of k requests")]


def validation_split(ctx: Context):
    """The bundle's own patient-disjoint validation split (its training config's data, fraction and seed)."""
    known = {f.name for f in fields(TrainConfig)}
    cfg = load_config(None, {**{k: v for k, v in ctx.manifest.training.items() if k in known},
                             "data_dir": str(ctx.data.data_dir), "limit_per_split": None})
    return load_data(cfg, ("val",))[0]["val"]


def randomised_cushion_study(ctx: Context, cushion: RandomisedJpegCushion, tries: int = 5,
                             attacks: tuple[str, ...] = STUDY_ATTACKS) -> dict:
    x, y = ctx.clean_test()
    s, classes = ctx.scale, ctx.manifest.classes
    val = validation_split(ctx)
    rate = ctx.manifest.calibration.clean_rejection_rate
    calibration = calibrate(ctx.net, val.tensor(), val.labels, cushion, classes, rate)
    designs: dict[str, tuple[CushionBase, np.ndarray]] = {
        "fixed": (ctx.cushion, ctx.thresholds),
        "randomised": (cushion, threshold_array(calibration.thresholds, classes))}
    log.info("randomised Cushion %s: thresholds %s at %.0f%% clean rejection on %d validation images",
             cushion.describe(), calibration.thresholds, 100 * rate, len(val.labels))
    pred = predict(ctx.net, x, ctx.cushion)[0].argmax(1)
    index = correct_subset(pred, y, s.eval_images, ctx.seed)  # the same images for both Cushions
    rows, clean = [], {}
    for design, (c, thresholds) in designs.items():
        clean[design] = clean_metrics(ctx.net, x, y, c, thresholds)
        thresholds_t = torch.from_numpy(thresholds).float()
        for eps in s.report_budgets:
            for name in attacks:
                if design == "fixed" and name == "wb_eot_cushion":
                    continue  # nothing to average over: it would be wb_diffjpeg again, ten times the cost
                attack = make_attack(name, eps=eps, steps=s.adaptive_steps, thresholds=thresholds_t,
                                     kappa=ctx.manifest.training.get("attack_kappa", 10.0))
                log.info("randomised study: %s Cushion, %s at %g/256 on %d images", design, name, eps * 256,
                         len(index))
                attacked = attack_set(ctx.net, attack, x, y, index, c, s.batch, ctx.seed)
                k = tries if design == "randomised" else 1
                passed = np.stack([bypassed(judge(ctx.net, attacked, c, thresholds)) for _ in range(k)])
                rows.append({"cushion": design, "attack": name, "eps": eps, "eps_256": eps * 256,
                             "steps": s.adaptive_steps, "attempted": len(index), "tries": k,
                             **share("bypass_rate", passed[0], s.bootstrap, ctx.seed),
                             **share("bypass_rate_tries", passed.any(0), s.bootstrap, ctx.seed)})
    notes = [
        f"Randomised Cushion: {cushion.describe()}; thresholds re-calibrated under its draws at the bundle's "
        f"{rate:.0%} clean rejection on {len(val.labels)} validation images: {calibration.thresholds} (the fixed "
        f"Cushion keeps the bundle's {ctx.manifest.thresholds}).",
        f"bypass = reached the target and accepted; '1 request' judges each attacked image under one fresh draw, "
        f"'any of k' under {tries} (the attacker resubmits). The fixed Cushion is deterministic: k = 1.",
        "wb_eot_cushion: WB with gradients averaged over draws of the Cushion's own distribution; against the fixed "
        "Cushion it would be wb_diffjpeg (nothing to average), so it runs on the randomised one only. Ship the "
        "randomised Cushion only if its EOT row is lower than the fixed Cushion's at every budget.",
    ]
    result = ctx.result("randomised", f"Randomised Cushion study: {ctx.manifest.name} {ctx.manifest.version}",
                        rows, notes, [])
    result["clean"] = clean
    result["randomised_thresholds"] = calibration.thresholds
    return result

