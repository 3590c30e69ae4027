"""A second opinion: does a robust referee under a bundle's diagnosis close the gaps of both? (Defence 3.0 study.)

The two designs fail at opposite budgets: 2.2.0 (accurate classifier, learnt Shields) is bypassed most at 8/256, a
TRADES classifier rejecting by confidence (`shield_kind=margin`) at 16/256, where its robustness runs out. The pair:
the bundle's classifier diagnoses; class c is accepted only if the bundle's Shield AND the referee's confidence in c
accept, `S_c = min(s_c - t_c, m_c - r_c)`: the bundle's Shield logit relative to its own threshold, and the referee
classifier's log-odds of c (`MarginShields`) relative to its threshold at the same clean rejection rate on the same
validation split. The pair is then calibrated at that rate on that split, like any bundle, and screened with the
report's attacks on the whole pair (the attacker has both networks). A study, not a bundle kind: the pair costs two
classifiers per image.

    python -m training.audit second-opinion --bundle models/default --referee runs/x/bundle --scale cpu --out DIR
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor, nn

from models.bundle import threshold_array
from models.networks import AegisNet, MarginShields
from training.audit.randomised import validation_split
from training.audit.report import security_report
from training.audit.tables import Context
from training.evaluate import calibrate, calibrate_logits, clean_metrics
from training.inference import predict

log = logging.getLogger("aegis.audit")


class SecondOpinion(nn.Module):
    """`forward(x)` -> (the primary's logits, N x K pair Shield logits): the outputs of a bundle's graph."""

    def __init__(self, primary: AegisNet, referee: AegisNet, primary_thresholds: np.ndarray,
                 referee_thresholds: np.ndarray):
        super().__init__()
        self.primary, self.referee, self.margin = primary, referee, MarginShields()
        self.register_buffer("primary_thresholds", torch.as_tensor(primary_thresholds, dtype=torch.float32))
        self.register_buffer("referee_thresholds", torch.as_tensor(referee_thresholds, dtype=torch.float32))

    @property
    def classifier(self) -> nn.Module:
        """The classifier that diagnoses: what Shield-blind attacks target and the report's ceiling measures (the
        referee's ceiling is in its own bundle's screen)."""
        return self.primary.classifier

    def referee_confidence(self, x: Tensor) -> Tensor:
        return self.margin(self.referee.classifier(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, shields = self.primary(x)
        return logits, torch.minimum(shields - self.primary_thresholds,
                                     self.referee_confidence(x) - self.referee_thresholds)


def second_opinion_study(ctx: Context, referee: AegisNet, referee_manifest, attacks: list[str]) -> dict:
    """`ctx`: the primary bundle's; `referee`: a bundle network whose classifier becomes the referee."""
    m = ctx.manifest
    if (referee_manifest.input, referee_manifest.cushion, referee_manifest.classes) != (m.input, m.cushion, m.classes):
        raise SystemExit("the referee must take the same input, Cushion and classes as the bundle")
    if referee_manifest.data.get("validation") != m.data.get("validation"):  # it may have trained on these images
        log.warning("the referee was trained with another validation split (%s; the bundle's: %s): its thresholds "
                    "are calibrated on images it may have learnt from", referee_manifest.data.get("validation"),
                    m.data.get("validation"))
    rate, classes = m.calibration.clean_rejection_rate, m.classes
    val = validation_split(ctx)
    x_val = val.tensor()
    logits, _ = predict(referee.classifier, x_val, m.cushion)
    confidence = MarginShields()(torch.from_numpy(logits)).numpy()
    referee_thresholds = threshold_array(calibrate_logits(logits, confidence, val.labels, classes, rate).thresholds,
                                         classes)
    pair = SecondOpinion(ctx.net, referee, ctx.thresholds, referee_thresholds).eval()
    calibration = calibrate(pair, x_val, val.labels, m.cushion, classes, rate)
    log.info("second opinion: referee thresholds %s, pair thresholds %s at %.0f%% clean rejection on %d validation "
             "images", referee_thresholds, calibration.thresholds, 100 * rate, len(val.labels))
    pair_ctx = Context(pair, m.model_copy(update={"thresholds": calibration.thresholds}), ctx.data, ctx.scale,
                       ctx.seed, ctx.command, substitute=ctx.substitute, attack_cache=ctx.attack_cache)
    result = security_report(pair_ctx, attacks)
    ctx.curves.update(pair_ctx.curves)
    result["title"] = f"Second opinion: {m.name} {m.version} + referee {referee_manifest.version}"
    x, y = ctx.clean_test()
    result["clean"] = {"bundle": clean_metrics(ctx.net, x, y, m.cushion, ctx.thresholds),
                       "referee": clean_metrics(referee, x, y, m.cushion, referee_manifest.threshold_array()),
                       "pair": clean_metrics(pair, x, y, m.cushion, pair_ctx.thresholds)}
    result["referee"] = {"name": referee_manifest.name, "version": referee_manifest.version,
                         "training": referee_manifest.training, "thresholds": dict(zip(classes,
                                                                                       referee_thresholds.tolist()))}
    result["pair_thresholds"] = calibration.thresholds
    result["notes"].insert(0, (
        f"Second opinion: the bundle diagnoses; class c is accepted iff min(Shield_c - t_c, referee log-odds of c - "
        f"r_c) clears the pair's threshold, calibrated at {rate:.0%} clean rejection on {len(val.labels)} validation "
        f"images (bundle t = {m.thresholds}; referee r = {result['referee']['thresholds']}; pair = "
        f"{calibration.thresholds}). Attacks that see the Shield see the whole pair; Shield-blind ones (pgd) the "
        "bundle's classifier, whose ceiling this is."))
    return result
