"""The attack engine (one PGD-family loop) and its objectives; see `engine.py` for the conventions."""

from training.attacks.bpda import exact_cushion, through_cushion
from training.attacks.engine import AttackResult, PGDConfig, Pipeline, pgd, quantise
from training.attacks.objectives import (CWObjective, Objective, ShieldOnlyObjective, WhiteBoxObjective, cw_margin,
                                         target_shield)

__all__ = [
    "AttackResult", "CWObjective", "Objective", "PGDConfig", "Pipeline", "ShieldOnlyObjective", "WhiteBoxObjective",
    "cw_margin", "exact_cushion", "pgd", "quantise", "target_shield", "through_cushion",
]
