"""Paper Tables 1-5 and their CPU-scale counterparts. Each `tableN(ctx, ...)` returns a result dict (rows, scale,
sanity flags, notes) plus ROC curves; `training.audit.__main__` writes them. Cells whose attack the library does
not offer yet are kept as rows with a "not available" status, so a table never silently changes its columns.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.bundle import threshold_array
from models.cushion import CushionBase, NoCushion, parse_cushion
from models.networks import AegisNet, build_aegis
from training.attacks import Objective, PGDConfig, exact_cushion, pgd
from training.audit.attacks import AttackUnavailable, make_attack
from training.audit.checks import Trial, announce, sanity_flags
from training.audit.detectors import make_detector
from training.audit.features import extract
from training.audit.harness import AuditData, attack_set, correct_subset, shield_row
from training.audit.scales import Scale
from training.config import load_config
from training.data import Split
from training.distributed import SINGLE_CPU
from training.evaluate import calibrate
from training.inference import predict
from training.metrics import detection_summary
from training.shields import train_shields

log = logging.getLogger("aegis.audit")
EPS_LINF, EPS_L2 = 16 / 256, 8 / 256  # paper §4.1 (the L2 budget is tiny: `attacks-reference.md` §0.1)
JPEG_SURROGATE_ATTACKS = {"wb_diffjpeg", "wb_eot", "wb_eot_cushion"}  # their backward pass is a differentiable JPEG


@dataclass
class Context:
    net: AegisNet
    manifest: object  # models.bundle.Manifest
    data: AuditData
    scale: Scale
    seed: int = 0
    command: str = ""
    curves: dict = field(default_factory=dict)
    substitute: torch.nn.Module | None = None  # the transfer attack's undefended source model
    attack_cache: Path | None = None  # the security report's attacked sets are kept there (`--attack-cache`)

    @property
    def cushion(self) -> CushionBase:
        return self.manifest.cushion

    @property
    def thresholds(self) -> np.ndarray:
        return self.manifest.threshold_array()

    @property
    def extras(self) -> dict:
        """What attacks beyond the bundle need: training images for Fea / HFC guides and mixtures, and the trained
        substitute of the transfer attack (`--substitute RUN_DIR`)."""
        return {"guide_pool": (self.data.x_train, torch.as_tensor(self.data.y_train)), "substitute": self.substitute}

    def clean_test(self) -> tuple[Tensor, np.ndarray]:
        n = self.scale.clean_images or len(self.data.y_test)
        return self.data.x_test[:n], self.data.y_test[:n]

    def result(self, table: str, title: str, rows: list[dict], notes: list[str], trials: list[Trial]) -> dict:
        flags = sanity_flags(trials)
        announce(flags)
        return {"table": table, "title": title, "scale": self.scale.to_dict(), "data": self.data.describe(),
                "bundle": {"name": self.manifest.name, "version": self.manifest.version,
                           "backbone": self.manifest.architecture.backbone, "taps": list(self.manifest.architecture.taps),
                           "cushion": self.manifest.cushion.model_dump(), "thresholds": self.manifest.thresholds},
                "command": self.command, "seed": self.seed, "notes": notes, "sanity_flags": flags, "rows": rows}


def _try_attack(name: str, ctx: Context, **kwargs):
    try:
        return make_attack(name, extras=ctx.extras, **kwargs), None
    except AttackUnavailable as error:
        log.warning("NOT AVAILABLE: %s", error)
        return None, f"not available: {error}"


def _trial(row: dict, attack, success_key: str = "sr_at_5fpr") -> Trial:
    """A sanity-check trial judged on what the attack optimises: end to end for attacks on the detector, the label
    alone for the conventional ones (a detector that catches a Shield-blind attack is not a sign of a broken one)."""
    cfg = attack.spec
    key = success_key if attack.sees_shield else "asr_label"
    return Trial(f"{row.get('defence', row.get('detector', ''))}/{attack.spec.name}", f"{row.get('defence', '')}/"
                 f"{attack.family}", cfg.eps, cfg.steps, row[key], row["attempted"], attack.kind)


# --------------------------------------------------------------------------------------- Tables 3 and 4: Shield/Aegis
def shield_table(ctx: Context, table: str, attack_names: list[str], adaptive: bool) -> dict:
    """Shield (the bundle's Shields without the Cushion) and Medical Aegis (with it) against each attack."""
    x, y = ctx.clean_test()
    thresholds_t = torch.from_numpy(ctx.thresholds).float()
    steps = ctx.scale.adaptive_steps if adaptive else ctx.scale.conventional_steps
    defences = [("Shield", NoCushion()), ("Medical Aegis", ctx.cushion)]
    rows, trials = [], []
    for defence, cushion in defences:
        pred = predict(ctx.net, x, cushion)[0].argmax(1)
        index = correct_subset(pred, y, ctx.scale.eval_images, ctx.seed)
        for name in attack_names:
            eps = EPS_L2 if name.endswith("l2") else EPS_LINF
            attack, status = _try_attack(name, ctx, eps=eps, steps=steps, thresholds=thresholds_t,
                                         kappa=ctx.manifest.training.get("attack_kappa", 10.0))
            base = {"defence": defence, "attack": name, "cushion": cushion.describe()}
            if attack is not None and name in JPEG_SURROGATE_ATTACKS and getattr(cushion, "kind", None) != "jpeg":
                attack, status = None, "not applicable: differentiates through a JPEG Cushion this defence lacks"
            if attack is None:
                rows.append({**base, "status": status})
                continue
            log.info("%s: %s vs %s on %d images", table, defence, name, len(index))
            attacked = attack_set(ctx.net, attack, x, y, index, cushion, ctx.scale.batch, ctx.seed)
            row, curve = shield_row(ctx.net, x, y, attacked, cushion, ctx.thresholds, ctx.scale.bootstrap, ctx.seed,
                                    judge_bypass=cushion == ctx.cushion)
            rows.append({**base, "status": "ok", "description": attack.spec.description, "eps": eps,
                         "steps": attack.spec.steps, **row})
            ctx.curves[f"{defence}/{name}"] = curve
            trials.append(_trial(rows[-1], attack))
    notes = [
        "Shield row = the bundle's Shields with the Cushion removed at inference (they were trained with the "
        "bundle's Cushion), not a separately trained Shield-only model as in the paper.",
        "AUROC / TPR: clean = correctly classified clean test images, adversarial = attacks that reached their "
        "target; score = routed Shield logit below its threshold. SR@5%: attack success at 5% clean FPR, over "
        "attempted images. Attacks go through the real Cushion with BPDA (identity backward) and are quantised.",
    ]
    kind = "adaptive" if adaptive else "conventional"
    return ctx.result(table, f"{table}: Shield and Medical Aegis vs {kind} attacks ({ctx.data.dataset}, "
                      f"{ctx.manifest.architecture.backbone})", rows, notes, trials)


TABLE3_ATTACKS = ["fgsm", "bim", "pgd", "mim", "dim", "tim", "cw", "pgd_l2", "cw_l2", "tf"]
TABLE4_ATTACKS = ["fea", "hfc", "wb", "wbd", "spgd", "opgd", "apgd_wb", "wb_diffjpeg"]  # last two: beyond the paper
SHIELD_COLUMNS = [("defence", "defence"), ("attack", "attack"), ("attempted", "n"), ("asr_label", "label ASR"),
                  ("auroc", "AUROC"), ("tpr_at_90tnr", "TPR@90%TNR"), ("sr_at_5fpr", "SR@5%FPR"),
                  ("bypass_rate", "bypass@τ"), ("status", "status")]


def table3(ctx: Context, attacks: list[str] | None = None) -> dict:
    return shield_table(ctx, "table3", attacks or TABLE3_ATTACKS, adaptive=False)


def table4(ctx: Context, attacks: list[str] | None = None) -> dict:
    return shield_table(ctx, "table4", attacks or TABLE4_ATTACKS, adaptive=True)


# ------------------------------------------------------------------------------------------ Table 2: baselines
TABLE2_ATTACKS = ["hfc", "hfc_cw"]  # HFC on PGD (CE) and on the CW margin (the library's two HFC variants)
BASELINE_COLUMNS = [("detector", "detector"), ("cushion", "Cushion"), ("attack", "attack"), ("attempted", "n"),
                    ("asr_label", "label ASR"), ("auroc", "AUROC"), ("tpr_at_90tnr", "TPR@90%TNR"),
                    ("sr_at_5fpr", "SR@5%FPR"), ("status", "status")]


def table2(ctx: Context, attacks: list[str] | None = None, detectors: tuple[str, ...] = ("kd", "lid", "maha", "dnn"),
           bu_passes: int = 20) -> dict:
    """KD, LID, MAHA and DNN, without and with the Cushion, then the bundle's Shield and Aegis, vs each attack.

    Detectors are fitted per (Cushion, attack) on a training subset (reference clean images + clean/attacked
    images), attack-aware as in the literature; evaluated on held-out test images.
    """
    attacks = attacks or TABLE2_ATTACKS
    s = ctx.scale
    n_ref = min(s.reference_images, len(ctx.data.y_train) // 2)
    x_ref, y_ref = ctx.data.x_train[:n_ref], ctx.data.y_train[:n_ref]
    x_fit, y_fit = ctx.data.x_train[n_ref:], ctx.data.y_train[n_ref:]
    x, y = ctx.clean_test()
    thresholds_t = torch.from_numpy(ctx.thresholds).float()
    rows, trials = [], []
    for name in attacks:
        attack, status = _try_attack(name, ctx, eps=EPS_LINF, steps=s.conventional_steps, thresholds=thresholds_t)
        if attack is None:
            rows += [{"detector": d, "cushion": c, "attack": name, "status": status}
                     for c in ("none", "cushion") for d in (*detectors, "shield")]
            continue
        for cushion_name, cushion in (("none", None), ("cushion", ctx.cushion)):
            clf = ctx.net.classifier
            reference = extract(clf, x_ref, cushion, bu_passes, seed=ctx.seed)
            ref_correct = reference.pred == y_ref
            fit_clean = extract(clf, x_fit, cushion, bu_passes, seed=ctx.seed)
            fit_index = correct_subset(fit_clean.pred, y_fit, s.fit_images, ctx.seed)
            fit_attacked = attack_set(ctx.net, attack, x_fit, y_fit, fit_index, cushion, s.batch, ctx.seed)
            fit_adv = extract(clf, fit_attacked.x_adv, cushion, bu_passes, seed=ctx.seed)
            fit_adv = fit_adv.take(fit_adv.pred == fit_attacked.targets)  # train on attacks that reached the target
            test_clean = extract(clf, x, cushion, bu_passes, seed=ctx.seed)
            test_correct = test_clean.pred == y
            index = correct_subset(test_clean.pred, y, s.eval_images, ctx.seed + 1)
            attacked = attack_set(ctx.net, attack, x, y, index, cushion, s.batch, ctx.seed + 1)
            test_adv = extract(clf, attacked.x_adv, cushion, bu_passes, seed=ctx.seed)
            reached = test_adv.pred == attacked.targets
            for det_name in detectors:
                kwargs = {"iterations": s.dnn_iterations, "seed": ctx.seed} if det_name == "dnn" else {}
                log.info("table2: %s (%s Cushion) vs %s", det_name, cushion_name, name)
                try:  # a detector that fails on this data fails its own cell, loudly, not the whole table
                    detector = make_detector(det_name, **kwargs).fit(reference.take(ref_correct), y_ref[ref_correct],
                                                                      fit_clean.take(fit_index), fit_adv)
                    clean_scores = detector.score(test_clean.take(test_correct))
                    adv_scores = detector.score(test_adv)
                    row = detection_summary(clean_scores, adv_scores, reached, s.bootstrap, ctx.seed)
                except ValueError as error:
                    log.error("table2: %s (%s Cushion) vs %s failed: %s", det_name, cushion_name, name, error)
                    rows.append({"detector": det_name, "cushion": cushion_name, "attack": name,
                                 "status": f"failed: {error}"})
                    continue
                rows.append({"detector": det_name, "cushion": cushion_name, "attack": name, "status": "ok",
                             "description": attack.spec.description, "fit_adversarial": len(fit_adv),
                             "max_linf": attacked.max_linf, **row})
                ctx.curves[f"{det_name}{'+C' if cushion else ''}/{name}"] = (clean_scores, adv_scores[reached])
                trials.append(_trial({**rows[-1], "defence": f"{det_name}/{cushion_name}"}, attack))
            row, curve = shield_row(ctx.net, x, y, attacked, cushion or NoCushion(), ctx.thresholds, s.bootstrap,
                                    ctx.seed, judge_bypass=cushion is not None)
            rows.append({"detector": "shield" if cushion is None else "aegis", "cushion": cushion_name,
                         "attack": name, "status": "ok", "description": attack.spec.description, **row})
            ctx.curves[f"{'shield' if cushion is None else 'aegis'}/{name}"] = curve
    notes = [
        "Attacks here ignore the detectors (they attack the classifier, with BPDA through the Cushion when present). "
        "The paper's Table 2 uses HFC-strengthened attacks; a row named mim/bim/pgd/cw is the plain attack, NOT HFC.",
        "KD: per-layer Gaussian KDE of the predicted class on standardised pooled features, bandwidth by "
        f"cross-validated likelihood, plus MC-dropout BU ({bu_passes} passes; ResNet: dropout on penultimate "
        "features as the substitute). LID: k=20 over a fixed clean reference batch of 100. MAHA: tied Ledoit-Wolf "
        "covariance, no input pre-processing. DNN: one conv detector per tap, logits summed.",
        "KD/LID/MAHA layers combined by the mean of clean-z-scored per-layer scores (the paper's average).",
        "shield/aegis rows: the bundle's Shields without / with the Cushion, on the same attacked images.",
    ]
    return ctx.result("table2", f"table2: detector baselines vs attacks ({ctx.data.dataset})", rows, notes, trials)


# ------------------------------------------------------------------------------------------ Table 1: stress test
class _LayerMean(torch.nn.Module):
    """mean(f_l(x)) per image as a 1-column output, so the attack engine can push it up or down."""

    def __init__(self, classifier, layer: int):
        super().__init__()
        self.classifier, self.layer = classifier, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.activation(x, self.layer).flatten(1).mean(1, keepdim=True)


@dataclass(frozen=True)
class _Push(Objective):
    sign: float = 1.0  # +1: decrease the mean (J↓ = mean f); -1: increase it (J↑ = -mean f)

    def label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.sign * logits[:, 0]

    def success(self, logits: Tensor, shield_logits: Tensor | None, target: Tensor) -> Tensor:
        # Never "successful" (and the target 1 is never the argmax of one column), so the engine keeps the iterate
        # of lowest loss: with success set, its float32 rank (1e9 + 1e6 - loss) cannot resolve loss differences.
        return torch.zeros_like(target, dtype=torch.bool)


STRESS_CUSHIONS = ("none", "jpeg:90", "jpeg:70")
STRESS_COLUMNS = [("layer", "layer"), ("cushion", "Cushion"), ("direction", "direction"), ("clean_mean", "clean mean"),
                  ("adv_mean", "attacked mean"), ("relative_change", "relative change"),
                  ("cushion_shift", "Cushion-only shift"), ("status", "status")]


def table1(ctx: Context, layers: list[int] | None = None, cushions: tuple[str, ...] = STRESS_CUSHIONS,
           eps: float = 4 / 256) -> dict:
    """Stress test (paper Table 1, `attacks-reference.md` §6): how far BIM at eps=4/256 moves mean(f_l)."""
    clf = ctx.net.classifier
    n_blocks = max(clf.tap_names_all)
    layers = layers or sorted({*ctx.manifest.architecture.taps, n_blocks})
    x = ctx.clean_test()[0][:ctx.scale.eval_images]
    steps = ctx.scale.stress_steps
    config = PGDConfig(eps=eps, steps=steps, step_size=1 / 256, random_start=False)
    rows = []
    for layer in layers:
        probe = _LayerMean(clf, layer).eval()
        with torch.no_grad():
            plain = float(probe(x).mean())
        for spec in cushions:
            cushion = parse_cushion(spec)
            with torch.no_grad():
                clean = float(probe(exact_cushion(x, cushion)).mean())
            for direction, sign in (("up", -1.0), ("down", 1.0)):
                torch.manual_seed(ctx.seed)
                target = torch.ones(len(x), dtype=torch.long)
                x_adv = torch.cat([pgd(probe, x[i:i + ctx.scale.batch], target[i:i + ctx.scale.batch],
                                       _Push(sign=sign), config, cushion=cushion).x_adv
                                   for i in range(0, len(x), ctx.scale.batch)])
                with torch.no_grad():
                    adv = float(probe(exact_cushion(x_adv, cushion)).mean())
                rows.append({"layer": f"{clf.tap_names_all[layer]}{' (last)' if layer == n_blocks else ''}",
                             "cushion": spec, "direction": direction, "status": "ok", "clean_mean": clean,
                             "adv_mean": adv, "relative_change": adv / clean - 1 if clean else float("nan"),
                             "cushion_shift": clean / plain - 1 if plain else float("nan"), "n": len(x)})
    notes = [f"BIM with J = ±mean(f_l), eps={eps * 256:g}/256, {steps} steps of 1/256, no random start; with a "
             "Cushion, BPDA (identity backward) through the real Cushion.",
             "relative change is against f_l of the Cushioned clean image (isolating the attack); the Cushion-only "
             "shift is Cushioned clean vs plain clean. The last block's mean equals the mean of the penultimate "
             "(pooled) features."]
    return ctx.result("table1", f"table1: stress test of layer activations ({ctx.data.dataset}, "
                      f"{ctx.manifest.architecture.backbone})", rows, notes, [])


# ------------------------------------------------------------------------------------- Table 5: ablations
ABLATION_COLUMNS = [("ablation", "ablation"), ("variant", "variant"), ("attack", "attack"),
                    ("clean_accuracy", "model acc."), ("auroc", "AUROC"), ("tpr_at_90tnr", "TPR@90%TNR"),
                    ("sr_at_5fpr", "SR@5%FPR"), ("status", "status")]


def _retrain_shields(ctx: Context, taps: tuple[int, ...], cushion_spec: dict) -> tuple[AegisNet, np.ndarray]:
    """New Shields on `taps` over the bundle's (frozen) classifier, trained at audit scale; thresholds on held-out
    training images at the bundle's clean rejection rate."""
    m = ctx.manifest
    s = ctx.scale
    training = {k: v for k, v in m.training.items() if k not in ("taps", "cushion")}
    if cushion_spec.get("kind") != "jpeg":  # a differentiable backward exists only for JPEG: identity BPDA elsewhere
        training["attack_bpda"] = "identity"
    cfg = load_config(None, {**training, "taps": list(taps), "cushion": cushion_spec, "shield_epochs": s.shield_epochs,
                             "curriculum_epochs": max(1, min(s.shield_epochs, m.training.get("curriculum_epochs", 5)))})
    net = build_aegis(m.architecture.backbone, len(m.classes), m.input.channels, (m.input.height, m.input.width),
                      taps, m.architecture.shield_width, shield_kind=m.architecture.shield_kind)
    net.classifier.load_state_dict(ctx.net.classifier.state_dict())
    n = s.shield_images or len(ctx.data.y_train) // 2
    images = (ctx.data.x_train[:n] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    split = Split(images, ctx.data.y_train[:n])
    cushion = parse_cushion(cushion_spec)
    with tempfile.TemporaryDirectory() as tmp:
        train_shields(cfg, net, {"train": split}, cushion, SINGLE_CPU, Path(tmp), None,
                      {"classifier": [], "shield": []})
    net.eval()
    held = slice(n, None)
    calibration = calibrate(net, ctx.data.x_train[held], ctx.data.y_train[held], cushion, m.classes,
                            m.calibration.clean_rejection_rate)
    return net, threshold_array(calibration.thresholds, m.classes)


def table5(ctx: Context, attacks: tuple[str, ...] = ("pgd", "cw", "hfc", "wb"),
           cushions: tuple[str, ...] = ("none", "jpeg:90", "jpeg:80", "jpeg:70", "bitdepth:5", "bitdepth:4", "tv")
           ) -> dict:
    """Layer ablation (Shields retrained on each single tap, and on all) and Cushion ablation (Shields retrained
    with each Cushion), all over the bundle's classifier."""
    m = ctx.manifest
    taps = tuple(m.architecture.taps)
    base_cushion = m.cushion.model_dump()
    variants = [("layers", f"taps {list(t)}", t, base_cushion) for t in [taps, *((t,) for t in taps)]]
    variants += [("cushion", c, taps, parse_cushion(c).model_dump()) for c in cushions]
    x, y = ctx.clean_test()
    rows, trials = [], []
    for ablation, variant, variant_taps, cushion_spec in variants:
        log.info("table5: %s %s: training Shields", ablation, variant)
        net, thresholds = _retrain_shields(ctx, variant_taps, cushion_spec)
        cushion = parse_cushion(cushion_spec)
        sub = Context(net, ctx.manifest, ctx.data, ctx.scale, ctx.seed)
        pred = predict(net, x, cushion)[0].argmax(1)
        accuracy = float((pred == y).mean())
        index = correct_subset(pred, y, ctx.scale.eval_images, ctx.seed)
        for name in attacks:
            steps = ctx.scale.adaptive_steps if name in ("wb", "wbd", "hfc", "fea") else ctx.scale.conventional_steps
            attack, status = _try_attack(name, ctx, eps=EPS_LINF, steps=steps,
                                         thresholds=torch.from_numpy(thresholds).float())
            base = {"ablation": ablation, "variant": variant, "attack": name, "clean_accuracy": accuracy}
            if attack is None:
                rows.append({**base, "status": status})
                continue
            attacked = attack_set(sub.net, attack, x, y, index, cushion, ctx.scale.batch, ctx.seed)
            row, _ = shield_row(net, x, y, attacked, cushion, thresholds, ctx.scale.bootstrap, ctx.seed, True)
            rows.append({**base, "status": "ok", **row})
            trials.append(_trial({**rows[-1], "defence": f"{ablation}/{variant}"}, attack))
    notes = [f"Shields retrained at audit scale ({ctx.scale.shield_epochs} epochs on {ctx.scale.shield_images or 'half'}"
             " training images) over the bundle's frozen classifier, which was trained with the bundle's own Cushion "
             "as augmentation; the paper retrains per variant at full scale.",
             "bitdepth:5 = the paper's Bit-3 (3 bits dropped), bitdepth:4 = Bit-4; tv = deterministic TV (Chambolle).",
             "The Shields' training attacker keeps the bundle's BPDA backward (attack_bpda) with JPEG Cushions and "
             "uses the identity backward with the others, for which no differentiable version exists."]
    return ctx.result("table5", f"table5: layer and Cushion ablations ({ctx.data.dataset})", rows, notes, trials)
