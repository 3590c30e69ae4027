"""The audit's single entry to the attack library (`training.attacks.library.build_attack`): `make_attack(name, ...)`.

Names are the library's (`ATTACKS`), plus the short names the paper's tables use (pgd, cw, tf). Attacks that need
more than the bundle (training images for Fea / HFC guides and mixtures, a trained substitute for the transfer
attack) get them from `extras`; when something is missing the table records the cell as "not available" with the
reason instead of silently substituting another attack.

Budgets are pixel units in [0, 1] (the paper writes k/256); all attacks are targeted and run through the real
Cushion with BPDA (identity backward unless the attack says otherwise) when the audited pipeline has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.cushion import CushionBase
from training.attacks.library import ALIASES, ATTACKS, AttackSpec, build_attack
from training.audit.crosscheck import torchattacks_pgd

# Attacks that ignore the Shield: run on the classifier alone (same result, a fraction of the compute).
CONVENTIONAL = {"fgsm", "bim", "pgd_linf", "pgd_l2", "mim", "dim", "tim", "cw_linf", "cw_l2", "apgd_ce",
                "transfer_vgg16"}
EXTERNAL = {"torchattacks_pgd"}  # attack code this project did not write (training/audit/crosscheck.py)
# Attacks whose CW confidence is the bundle's training kappa (the WB objective's); HFC keeps its own (its margin
# is on another scale) and the (N+1)-class attack's cross-entropy has none.
TAKES_BUNDLE_KAPPA = {"wb", "wbd", "spgd", "opgd", "apgd_wb", "wb_diffjpeg", "wb_eot", "wb_eot_cushion", "fea",
                      "fea_cw"}
NEEDS = {"fea": "guide_pool", "fea_cw": "guide_pool", "hfc": "guide_pool", "hfc_cw": "guide_pool",
         "hfc_ref": "guide_pool", "transfer_vgg16": "substitute"}


class AttackUnavailable(RuntimeError):
    """The attack exists but this audit lacks what it needs (e.g. a trained substitute model)."""


@dataclass(frozen=True)
class Attack:
    spec: AttackSpec
    family: str  # results of one family are compared by the sanity checks (steps, eps)
    sees_shield: bool  # attacks the Shield logits too (adaptive); else the classifier alone
    kind: str = "white-box"


def describe(spec: AttackSpec) -> Attack:
    """An Attack around a library spec (e.g. from `training.evaluate.attack_suite`, named pgd20, wb100...)."""
    family = ALIASES.get(spec.name.rstrip("0123456789"), spec.name.rstrip("0123456789"))
    family = {"pgd": "pgd_linf"}.get(family, family)
    conventional = family in CONVENTIONAL
    return Attack(spec, family, sees_shield=not conventional,
                  kind="transfer" if family == "transfer_vgg16" else "white-box")


def make_attack(name: str, *, eps: float, steps: int, thresholds: Tensor | None = None, kappa: float = 10.0,
                extras: dict | None = None) -> Attack:
    """Build a named attack. `thresholds` (the bundle's, per class) are needed by the attacks on the Shield and make
    the others' success end-to-end; `kappa` is the CW confidence of the adaptive objectives; `extras` may hold
    `guide_pool=(x_train, y_train)` and `substitute=<trained classifier>`."""
    library_name = ALIASES.get(name, name)
    if library_name in EXTERNAL:
        return _external(library_name, eps, steps, thresholds)
    if library_name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted({*ATTACKS, *ALIASES, *EXTERNAL})}")
    options: dict = {}
    need = NEEDS.get(library_name)
    if need is not None:
        if not extras or extras.get(need) is None:
            raise AttackUnavailable(f"attack {name!r} needs {need}= (not provided to this audit)")
        options[need] = extras[need]
    if library_name in TAKES_BUNDLE_KAPPA:
        options["kappa"] = kappa
    conventional = library_name in CONVENTIONAL
    spec = build_attack(library_name, eps=eps, steps=steps, thresholds=None if conventional else thresholds,
                        **options)
    return Attack(spec, library_name, sees_shield=not conventional,
                  kind="transfer" if library_name == "transfer_vgg16" else "white-box")


def _external(name: str, eps: float, steps: int, thresholds: Tensor | None) -> Attack:
    try:
        import torchattacks  # noqa: F401 - a dev dependency, not a training one
    except ImportError:
        raise AttackUnavailable(f"attack {name!r} needs the torchattacks package (the dev extra)") from None
    if thresholds is None:
        raise AttackUnavailable(f"attack {name!r} attacks the Shield and needs the bundle's thresholds")
    return Attack(torchattacks_pgd(eps, steps, thresholds), "external", sees_shield=True)


def targets_for(labels: Tensor, num_classes: int, seed: int) -> Tensor:
    """A target other than the true class (binary tasks: the other class), fixed by `seed`."""
    offset = torch.randint(1, num_classes, labels.shape, generator=torch.Generator().manual_seed(seed))
    return (labels + offset) % num_classes


def run_attack(net, attack: Attack, x: Tensor, targets: Tensor, cushion: CushionBase | None, batch: int = 50, seed: int = 0) -> Tensor:
    """Adversarial images (uint8 levels) for `x`; the classifier alone is attacked unless the attack sees the Shield."""
    model = net if attack.sees_shield else net.classifier
    torch.manual_seed(seed)
    out = [attack.spec(model, x[i:i + batch], targets[i:i + batch], cushion).x_adv for i in range(0, len(x), batch)]
    return torch.cat(out) if out else x[:0]
