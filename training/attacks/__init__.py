"""The attack engine (one PGD-family loop), its objectives and hooks, and the named attack library.

`library.build_attack(name, ...)` is the entry point for evaluations; `engine.py` states the conventions.
"""

from training.attacks.bpda import exact_cushion, through_cushion
from training.attacks.cw_l2 import cw_l2
from training.attacks.engine import AttackResult, CushionedModel, PGDConfig, into_budget, judge, pgd, quantise
from training.attacks.feature_attacks import fit_hfc_mixtures, nearest_guides
from training.attacks.library import (ATTACKS, AttackSpec, build_attack, eps_sweep, jpeg_quality, long_name,
                                      with_transfer_smoothing)
from training.attacks.objectives import (CWObjective, DivergenceObjective, FeatureObjective, GaussianMixture,
                                         HFCObjective, Objective, RejectClassObjective, ShieldOnlyObjective,
                                         WhiteBoxObjective, cw_margin, reject_as_class, target_shield)
from training.attacks.transforms import DiffJpeg, DiverseInput, GaussianSmoothing, RandomTranslate, gaussian_kernel

__all__ = [
    "ATTACKS", "AttackResult", "AttackSpec", "CWObjective", "CushionedModel", "DiffJpeg", "DivergenceObjective", "DiverseInput", "FeatureObjective",
    "GaussianMixture", "GaussianSmoothing", "HFCObjective", "Objective", "PGDConfig", "RandomTranslate",
    "RejectClassObjective", "ShieldOnlyObjective", "WhiteBoxObjective", "build_attack", "cw_l2", "cw_margin", "eps_sweep", "exact_cushion",
    "fit_hfc_mixtures", "gaussian_kernel", "into_budget", "jpeg_quality", "judge", "long_name", "nearest_guides", "pgd", "quantise", "reject_as_class", "target_shield",
    "through_cushion", "with_transfer_smoothing",
]
