"""The security report of a bundle: the acceptance-relevant attacks with intervals, an eps and steps sweep for the
sanity flags, ROC curves; written into the bundle and listed in `manifest.reports` (hashes re-written).

Files: `security_report.json` (key `security_report`, served at GET /v1/model), `security_report.md`
(key `security_report_md`) and `security_report_roc.png` (hashed in `manifest.files`, named in the JSON).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from models.bundle import Bundle
from training.attacks.library import long_name
from training.audit.attacks import Attack, describe, make_attack
from training.audit.ceiling import ceiling_markdown, robust_accuracy
from training.audit.checks import Trial
from training.audit.harness import AttackCache, attack_set, bypassed, correct_subset, judge, share, shield_row
from training.audit.outputs import render_result
from training.audit.tables import Context
from training.evaluate import attack_suite, clean_metrics
from training.export import update_bundle
from training.inference import predict

log = logging.getLogger("aegis.audit")
REPORT_KEYS = {"security_report": "security_report.json", "security_report_md": "security_report.md"}
REPORT_EXTRA_ATTACKS = ("opgd", "apgd_wb", "wb_n1", "wb_n1_ti", "wb_diffjpeg", "wb_eot")
# Shield-blind attacks at Table 3's steps that beat the white-box rows: TI-FGSM's smoothed, low-frequency perturbation
# passed 2.2.0's Shields on 75% of images at 16/256 (Table 3), more than any attack that sees them.
REPORT_CONVENTIONAL_ATTACKS = ("tim",)
REPORT_COLUMNS = [("attack", "attack"), ("eps_256", "ε (/256)"), ("steps", "steps"), ("attempted", "n"),
                  ("asr_label", "label ASR"), ("auroc", "AUROC"), ("tpr_at_90tnr", "TPR@90%TNR"),
                  ("tpr_at_95tnr", "TPR@95%TNR"), ("sr_at_5fpr", "SR@5%FPR"), ("bypass_rate", "bypass@τ")]


def security_report(ctx: Context, attacks: list[str] | None = None) -> dict:
    """`attacks` (names such as "wb", "apgd_wb", "tf"): a screen with those attacks only, at every budget, for
    comparing designs cheaply; its max bypass is over them only, so it is never a bundle's security report."""
    x, y = ctx.clean_test()
    cushion, thresholds = ctx.cushion, ctx.thresholds
    thresholds_t = torch.from_numpy(thresholds).float()
    s = ctx.scale
    kappa = ctx.manifest.training.get("attack_kappa", 10.0)
    pred = predict(ctx.net, x, cushion)[0].argmax(1)
    index = correct_subset(pred, y, s.eval_images, ctx.seed)
    # At every report budget (an attacker picks the budget): the acceptance suite (training.evaluate), then attacks
    # stronger than the paper (`attacks-reference.md` §3.8): other directions, APGD, the (N+1)-class objective (the
    # one `attack_objective=n1` Shields are trained against, also with a smoothed gradient), a differentiable-JPEG
    # backward pass, EOT, TI-FGSM; with `--substitute`, the transfer attack. Keys carry `@eps` below the paper's
    # 16/256. Each run: (attack, key, attack).
    runs: list[tuple[str, str, Attack]] = []
    for eps in s.report_budgets:
        at = "" if eps == 16 / 256 else f"@{eps * 256:g}"
        runs += [(spec.name.removesuffix(str(spec.steps)), spec.name + at, describe(spec))
                 for spec in attack_suite(thresholds_t, steps=s.adaptive_steps, kappa=kappa, eps=eps)]
        runs += [(name, f"{name}{s.adaptive_steps}{at}",
                  make_attack(name, eps=eps, steps=s.adaptive_steps, thresholds=thresholds_t, kappa=kappa))
                 for name in REPORT_EXTRA_ATTACKS]
        runs += [(name, f"{name}{s.conventional_steps}{at}",
                  make_attack(name, eps=eps, steps=s.conventional_steps, thresholds=thresholds_t))
                 for name in REPORT_CONVENTIONAL_ATTACKS]
        if ctx.substitute is not None:  # the attacker without model files (Table 3's TF, same steps)
            runs.append(("tf", f"tf{s.conventional_steps}{at}", make_attack("tf", eps=eps, steps=s.conventional_steps,
                                                                            thresholds=thresholds_t,
                                                                            extras=ctx.extras)))
    # The sanity sweeps of WB: budgets outside the report's (up to 64/256, where any defence must fall), half steps.
    for eps in s.eps_sweep:
        if eps not in s.report_budgets:
            runs.append(("wb", f"wb{s.adaptive_steps}@{eps * 256:g}",
                         make_attack("wb", eps=eps, steps=s.adaptive_steps, thresholds=thresholds_t, kappa=kappa)))
    half = max(1, s.adaptive_steps // 2)
    runs.append(("wb", f"wb{half}", make_attack("wb", eps=16 / 256, steps=half, thresholds=thresholds_t, kappa=kappa)))
    if attacks is not None:
        unknown = set(attacks) - {base for base, _, _ in runs}
        if unknown:
            raise ValueError(f"unknown report attacks {sorted(unknown)}; choose from "
                             f"{sorted({base for base, _, _ in runs})}")
        runs = [run for run in runs if run[0] in attacks]
    cache = (None if ctx.attack_cache is None else
             AttackCache(ctx.attack_cache, ctx.net, thresholds=thresholds, substitute=ctx.substitute))
    rows, trials, outcomes = [], [], []
    for _, name, attack in runs:
        log.info("security report: %s on %d images", name, len(index))
        attacked = (attack_set(ctx.net, attack, x, y, index, cushion, s.batch, ctx.seed) if cache is None else
                    cache.attack_set(name, ctx.net, attack, x, y, index, cushion, s.batch, ctx.seed))
        judged = judge(ctx.net, attacked, cushion, thresholds)
        row, curve = shield_row(ctx.net, x, y, attacked, cushion, thresholds, s.bootstrap, ctx.seed, True, judged)
        cfg = attack.spec
        if cfg.eps in s.report_budgets:
            outcomes.append((cfg.eps, bypassed(judged)))
        rows.append({"attack": name, "description": cfg.description, "eps": cfg.eps, "eps_256": cfg.eps * 256,
                     "steps": cfg.steps, "status": "ok", "in_threat_model": cfg.eps in s.report_budgets, **row})
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
    title = f"Security report: {ctx.manifest.name} {ctx.manifest.version}"
    if attacks is not None:
        title = f"Security screen ({', '.join(attacks)} only): {ctx.manifest.name} {ctx.manifest.version}"
        notes.insert(0, f"A screen, not a security report: only {', '.join(attacks)}; the strongest attack is the "
                        "strongest of these.")
    result = ctx.result("report", title, rows, notes, trials)
    result["screen"] = attacks
    result["clean"] = clean_metrics(ctx.net, x, y, cushion, thresholds)
    result["max_bypass"] = max_bypass(rows)
    result["any_attack"] = any_attack(outcomes, s.bootstrap, ctx.seed)
    ceiling = (ctx.net.classifier, x, y, cushion, s.eval_images, s.adaptive_steps, s.report_budgets, s.batch, ctx.seed,
               s.bootstrap)
    result["ceiling"] = robust_accuracy(*ceiling) if cache is None else cache.ceiling(robust_accuracy, *ceiling)
    result["summary_md"] = f"**{summary_line(result)}**\n\n{ceiling_markdown(result['ceiling'])}"
    return result


def max_bypass(rows: list[dict]) -> dict:
    """The end-to-end figure an attacker picks: the highest bypass@τ over every attack and budget of the threat
    model (the report budgets; the 64/256 sanity sweep is outside it), with its row's bootstrap interval."""
    worst = max((r for r in rows if r.get("status") == "ok" and r.get("in_threat_model")),
                key=lambda r: r["bypass_rate"])
    return {"attack": worst["attack"], "eps_256": worst["eps_256"], "bypass_rate": worst["bypass_rate"],
            "bypass_rate_ci95": worst["bypass_rate_ci95"], "attempted": worst["attempted"]}


def any_attack(outcomes: list[tuple[float, np.ndarray]], n_resamples: int, seed: int) -> list[dict]:
    """The attacker who runs every attack of the report on each image and keeps one that passes (worst case per
    image, as AutoAttack counts robust accuracy): per budget, the share of attempted images bypassed by at least one
    attack at that budget or a smaller one, since a perturbation within 4/256 is also within 16/256. `outcomes`:
    (eps, bypassed per image) for every run, all on the same images. At least the highest single row."""
    rows = []
    for eps in sorted({e for e, _ in outcomes}):
        hit = np.logical_or.reduce([b for e, b in outcomes if e <= eps])
        if len(hit):
            rows.append({"eps_256": eps * 256, "attempted": len(hit), **share("bypass_rate", hit, n_resamples, seed)})
    return rows


CARD_BEGIN, CARD_END = "<!-- security-report:begin -->", "<!-- security-report:end -->"


def card_section(result: dict) -> str:
    """The model card's security section, generated from the report, so that card and report cannot disagree."""
    rows = [r for r in result["rows"] if r.get("status") == "ok" and r.get("in_threat_model", r.get("eps") == 16 / 256)]
    rows.sort(key=lambda r: -r["bypass_rate"])
    table = "\n".join(f"| {r['attack']} | {long_name(r['attack'])} | {r['eps_256']:g} | {r['attempted']} | "
                      f"{r['bypass_rate']:.3f} | {r['sr_at_5fpr']:.3f} | {r['auroc']:.3f} |" for r in rows)
    flags = "".join(f"\n- `{f['flag']}`: {f['message']}" for f in result["sanity_flags"]) or " none."
    worst = result.get("max_bypass")
    verdict = ("" if worst is None else
               f"Strongest attack over every budget: **{worst['attack']}** at {worst['eps_256']:g}/256, which passes "
               f"the Shield on {worst['bypass_rate']:.0%} of attempted images{_interval(worst, '.0%')}. ")
    verdict += any_attack_sentence(result)
    ceiling = f"\n{ceiling_markdown(result['ceiling'])}\n" if "ceiling" in result else ""
    return f"""{CARD_BEGIN}
## Security report (generated from `security_report.json`)
{verdict}A bypass rate near 1 means the defence does not hold against that attacker; the report's notes say what
each attack is. Scale: {result['scale']['eval_images']} correctly classified test images per attack; command:
`{result['command']}`.

| attack | what | ε (/256) | attempted | bypass@τ | SR@5%FPR | AUROC |
|---|---|---|---|---|---|---|
{table}

The robustness ceiling (Tramèr 2022: a detector robust at ε gives a classifier robust at ε/2, so the robustness of the
classifier under the Shields bounds what they can detect):
{ceiling}
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
    worst = result["max_bypass"]
    line = (f"strongest over all budgets: {worst['attack']} at {worst['eps_256']:g}/256, bypass "
            f"{worst['bypass_rate']:.3f}{_interval(worst, '.3f')}")
    if result.get("any_attack"):
        top = result["any_attack"][-1]
        line += (f"; every attack tried on each image, up to {top['eps_256']:g}/256: bypass "
                 f"{top['bypass_rate']:.3f}{_interval(top, '.3f')}")
    return f"{line}; {len(result['sanity_flags'])} sanity flag(s)"


def any_attack_sentence(result: dict) -> str:
    rows = result.get("any_attack") or []
    if not rows:
        return ""
    figures = ", ".join(f"{r['bypass_rate']:.0%}{_interval(r, '.0%')} up to {r['eps_256']:g}/256" for r in rows)
    return f"An attacker who tries every attack of this report on each image and keeps one that passes: {figures}. "


def _interval(row: dict, spec: str) -> str:
    """' (95% CI low–high)' of a row's bypass rate, or nothing when there is none (too few images; NaN or None)."""
    ci = row.get("bypass_rate_ci95") or ()
    if len(ci) != 2 or not all(isinstance(c, (int, float)) and c == c for c in ci):
        return ""
    return f" (95% CI {ci[0]:{spec}}–{ci[1]:{spec}})"
