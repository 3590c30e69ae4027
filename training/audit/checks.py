"""Sanity flags on attack results, in the spirit of AutoAttack's `checks.py` (Carlini et al. 2019, "On evaluating
adversarial robustness"; Tramèr et al. 2020). They are computed from the results, printed loudly and stored in every
JSON the audit writes; a flag means the evaluation (not the defence) is suspect until explained.

Each result is a `Trial`: one attack configuration and its end-to-end success rate (reach the target AND pass the
detector at its operating point) over `n` attempted images. Comparisons allow for sampling noise: a difference
counts only when it exceeds `tolerance` plus two binomial standard errors.

Flags (see docs/audit.md for the remedies):
- `more_steps_weaker`: the same attack at the same eps succeeds less with more steps (rounding per step, a bad
  step-size schedule, or not keeping the best iterate).
- `larger_eps_weaker`: the same attack succeeds less with a larger budget.
- `large_eps_not_broken`: at eps >= `large_eps` (64/256 by default, far beyond any imperceptible budget) an
  attack stays below `broken_rate` success: the attack cannot optimise this pipeline (gradient masking, BPDA fault).
- `zero_at_max_eps`: an attack whose success is ~0 at the largest eps it was run with.
- `transfer_beats_white_box`: a transfer (or noise / black-box) attack beats every white-box attack at that eps.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass

log = logging.getLogger("aegis.audit")


@dataclass(frozen=True)
class Trial:
    attack: str  # the row name, e.g. "wb100@16"
    family: str  # configurations of one family are compared with each other, e.g. "wb"
    eps: float
    steps: int
    success: float
    n: int
    kind: str = "white-box"  # "white-box" | "transfer" | "black-box" | "noise"


def _noise(a: Trial, b: Trial) -> float:
    def se(t: Trial) -> float:
        return math.sqrt(max(t.success * (1 - t.success), 0.25 / max(t.n, 1)) / max(t.n, 1))
    return 2 * math.hypot(se(a), se(b))


def sanity_flags(trials: list[Trial], tolerance: float = 0.02, large_eps: float = 64 / 256,
                 broken_rate: float = 0.95, zero_rate: float = 0.01) -> list[dict]:
    flags = []

    def flag(kind: str, message: str, *involved: Trial) -> None:
        flags.append({"flag": kind, "message": message, "attacks": [t.attack for t in involved]})

    families: dict[str, list[Trial]] = defaultdict(list)
    for t in trials:
        families[t.family].append(t)
    for members in families.values():
        for a in members:
            for b in members:
                worse = a.success - b.success > tolerance + _noise(a, b)
                if a.eps == b.eps and b.steps > a.steps and worse:
                    flag("more_steps_weaker", f"{b.attack} ({b.steps} steps) succeeds {b.success:.3f} < "
                         f"{a.attack} ({a.steps} steps) {a.success:.3f} at the same eps", a, b)
                if a.steps == b.steps and b.eps > a.eps and worse:
                    flag("larger_eps_weaker", f"{b.attack} (eps {b.eps * 256:g}/256) succeeds {b.success:.3f} < "
                         f"{a.attack} (eps {a.eps * 256:g}/256) {a.success:.3f}", a, b)
        top = max(m.eps for m in members)
        for t in members:
            if t.eps == top and t.success <= zero_rate:
                flag("zero_at_max_eps", f"{t.attack} succeeds {t.success:.3f} at its largest eps "
                     f"{t.eps * 256:g}/256: a broken or masked attack, not evidence of robustness", t)
            if t.eps >= large_eps and t.success < broken_rate and t.kind == "white-box":
                flag("large_eps_not_broken", f"{t.attack} reaches only {t.success:.3f} success at eps "
                     f"{t.eps * 256:g}/256; an unconstrained-scale attack should reach ~100%", t)
    white = [t for t in trials if t.kind == "white-box"]
    for t in trials:
        if t.kind == "white-box":
            continue
        rivals = [w for w in white if w.eps == t.eps]
        if rivals:
            best = max(rivals, key=lambda w: w.success)
            if t.success - best.success > tolerance + _noise(t, best):
                flag("transfer_beats_white_box", f"{t.kind} attack {t.attack} succeeds {t.success:.3f} > best "
                     f"white-box {best.attack} {best.success:.3f} at eps {t.eps * 256:g}/256", t, best)
    return flags


def announce(flags: list[dict]) -> None:
    """Print every flag loudly on stderr (and log it): these must not scroll by unnoticed."""
    if not flags:
        log.info("sanity checks: no flags")
        return
    bar = "!" * 100
    lines = [bar, f"!!! AUDIT SANITY FLAGS ({len(flags)}): the evaluation itself is suspect until explained", bar]
    lines += [f"!!! [{f['flag']}] {f['message']}" for f in flags]
    lines.append(bar)
    print("\n".join(lines), file=sys.stderr, flush=True)
    for f in flags:
        log.warning("sanity flag %s: %s", f["flag"], f["message"])
