"""The closed sets of option values of training and attacks, as `Literal` types, and the check that enforces them.

Dataclasses do not check their annotations, so `PGDConfig(norm="Linf")` would run silently as something else;
`check_literals` turns every `Literal` field into a clear `ValueError` at construction.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Literal, Union, get_args, get_origin

Dataset = Literal["kermany", "aptos"]
Norm = Literal["linf", "l2"]
Direction = Literal["sum", "selective", "orthogonal"]  # how label and detector gradients combine (engine)
Optimiser = Literal["pgd", "apgd"]
# the training attacker's objectives (joined by "+" in `TrainConfig.attack_objective` to alternate them)
ObjectiveName = Literal["wb", "n1", "shield", "ce"]
BpdaBackward = Literal["identity", "diffjpeg", "mixed"]
Smoothing = Literal["none", "mixed"]
# the classifier's adversarial-training loss: "pgd_at" (Madry et al.: CE on a mix of PGD and clean images), "trades"
# (Zhang et al. 2019: clean CE + beta KL(clean || adversarial)), "mart" (Wang et al. 2020: boosted CE on adversarial
# images + beta KL weighted by how badly the clean image is classified)
ClassifierObjective = Literal["pgd_at", "trades", "mart"]
ShieldKind = Literal["per_class", "shared_trunk", "margin"]  # models.networks.SHIELD_KINDS
EpsSchedule = Literal["curriculum", "uniform"]


def choices(annotation) -> tuple | None:
    """The allowed values of a `Literal[...]` annotation (None allowed too for `Literal[...] | None`), else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        found = [choices(arm) for arm in get_args(annotation)]
        literal = [c for c in found if c]
        if literal:
            allows_none = type(None) in get_args(annotation)
            return tuple(v for c in literal for v in c) + ((None,) if allows_none else ())
    return None


def check_literals(instance) -> None:
    """Raise ValueError naming the field and its choices when a dataclass field holds a value outside its Literal."""
    hints = typing.get_type_hints(type(instance))
    for f in fields(instance):
        allowed = choices(hints[f.name])
        value = getattr(instance, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{type(instance).__name__}.{f.name} must be one of "
                             f"{', '.join(repr(a) for a in allowed)}; got {value!r}")
