"""The security report of a bundle: the acceptance-relevant attacks with intervals, an eps and steps sweep for the
sanity flags, ROC curves; written into the bundle and listed in `manifest.reports` (hashes re-written).

Files: `security_report.json` (key `security_report`, served at GET /v1/model), `security_report.md`
(key `security_report_md`) and `security_report_roc.png` (hashed in `manifest.files`, named in the JSON).
"""

from __future__ import annotations

import logging

import torch

from models.bundle import Bundle
from training.attacks.library import long_name
from training.audit.attacks import Attack, describe, make_attack
from training.audit.checks import Trial
from training.audit.harness import attack_set, correct_subset, shield_row
from training.audit.outputs import render_result
from training.audit.tables import Context
from training.evaluate import attack_suite, clean_metrics
from training.export import update_bundle
from training.inference import predict

log = logging.getLogger("aegis.audit")
REPORT_KEYS = {"security_report": "security_report.json", "security_report_md": "security_report.md"}
REPORT_EXTRA_ATTACKS = ("opgd", "apgd_wb", "wb_n1", "wb_diffjpeg", "wb_eot")
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
    # Stronger than the paper (`attacks-reference.md` §3.8): other directions, APGD, the (N+1)-class objective (the
    # one `attack_objective=n1` Shields are trained against), a differentiable-JPEG backward
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
    if ctx.substitute is not None:  # `--substitute`: the attacker without model files (Table 3's TF, same steps)
        runs.append((f"tf{s.conventional_steps}", make_attack("tf", eps=16 / 256, steps=s.conventional_steps,
                                                              thresholds=thresholds_t, extras=ctx.extras)))
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
        # What the attack optimises: end to end for attacks on the Shield; the label for white-box attacks on the
        # classifier alone; end to end for a transfer attack, which competes with the white-box rows for bypass.
        end_to_end = attack.sees_shield or attack.kind != "white-box"
        success = row["bypass_rate"] if end_to_end else row["asr_label"]
        trials.append(Trial(name, family, cfg.eps, cfg.steps, success, row["attempted"], attack.kind))
    notes = [
        "Attacks: targeted, L∞, through the bundle's real Cushion with BPDA (identity backward unless the attack says "
        "otherwise), quantised to uint8, judged at the bundle's thresholds. attempted = correctly classified clean "
        "test images.",
        "bypass@τ = reach the target AND accepted at the bundle's thresholds, over attempted: the end-to-end figure. "
        "SR@5% = the same at a threshold set to 5% FPR on the clean test images (Bryniarski et al. 2022).",
        "Sanity flags use bypass@τ. Beyond the paper: orthogonal PGD, APGD, the (N+1)-class objective, BPDA "
        "through a differentiable JPEG and EOT; with `--substitute`, the transfer attack (tf: MI-DI-TI from a "
        "substitute classifier, no model files), judged end to end like the white-box rows. Still stronger "
        "evaluations (more steps and restarts, feature and HFC attacks: Tables 2 and 4) may do better; a high AUROC "
        "is a reason for more attacks, not a result.",
    ]
    result = ctx.result("report", f"Security report: {ctx.manifest.name} {ctx.manifest.version}", rows, notes, trials)
    result["clean"] = clean_metrics(ctx.net, x, y, cushion, thresholds)
    return result


CARD_BEGIN, CARD_END = "<!-- security-report:begin -->", "<!-- security-report:end -->"


def card_section(result: dict) -> str:
    """The model card's security section, generated from the report, so that card and report cannot disagree."""
    rows = [r for r in result["rows"] if r.get("status") == "ok" and r.get("eps") == 16 / 256]
    rows.sort(key=lambda r: -r["bypass_rate"])
    table = "\n".join(f"| {r['attack']} | {long_name(r['attack'])} | {r['attempted']} | {r['bypass_rate']:.3f} | "
                      f"{r['sr_at_5fpr']:.3f} | {r['auroc']:.3f} |" for r in rows)
    flags = "".join(f"\n- `{f['flag']}`: {f['message']}" for f in result["sanity_flags"]) or " none."
    strongest = rows[0] if rows else None
    verdict = ("" if strongest is None else
               f"Strongest attack at 16/256: **{strongest['attack']}**, which passes the Shield on "
               f"{strongest['bypass_rate']:.0%} of attempted images. ")
    return f"""{CARD_BEGIN}
## Security report (generated from `security_report.json`)
{verdict}A bypass rate near 1 means the defence does not hold against that attacker; the report's notes say what
each attack is. Scale: {result['scale']['eval_images']} correctly classified test images per attack; command:
`{result['command']}`.

| attack (16/256) | what | attempted | bypass@τ | SR@5%FPR | AUROC |
|---|---|---|---|---|---|
{table}

Sanity flags:{flags}
{CARD_END}
"""


def _with_card_section(card: str, section: str) -> str:
    if CARD_BEGIN in card and CARD_END in card:
        before, rest = card.split(CARD_BEGIN, 1)
        return before + section.rstrip("\n") + rest.split(CARD_END, 1)[1]
    return card.rstrip("\n") + "\n\n" + section


def write_into_bundle(bundle: Bundle, result: dict) -> list:
    """Write the report files into the bundle folder, its summary into the model card, and re-write the manifest
    (reports + every file's hash); returns the report files' paths."""
    curves = result.pop("_curves", None)
    files = render_result(result, "security_report", REPORT_COLUMNS, curves)
    update_bundle(bundle, files=files, card=_with_card_section(bundle.model_card(), card_section(result)),
                  reports=REPORT_KEYS)
    return [bundle.root / name for name in files]


def summary_line(result: dict) -> str:
    best = max((r for r in result["rows"] if r.get("eps") == 16 / 256), key=lambda r: r.get("bypass_rate", 0))
    return (f"strongest at 16/256: {best['attack']} bypass {best['bypass_rate']:.3f}, SR@5% {best['sr_at_5fpr']:.3f}; "
            f"{len(result['sanity_flags'])} sanity flag(s)")

