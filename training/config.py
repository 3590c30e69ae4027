"""Training configuration: one frozen dataclass, named presets in `training/presets/*.json`, dotted overrides.

Every run writes its resolved config next to its checkpoints, and the bundle carries it in its manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args

from training.options import (BpdaBackward, ClassifierObjective, Dataset, Direction, EpsSchedule, ObjectiveName,
                              ShieldKind, Smoothing, check_literals)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DATA_FOLDERS = {"kermany": "kermany-pneumonia", "aptos": "aptos2019-dr"}
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset_dir(dataset: str, data_dir: str | Path | None = None) -> Path:
    """`data_dir` when given, else $AEGIS_DATA_DIR/<dataset folder>, else ../shared/data/<dataset folder>."""
    if data_dir:
        return Path(data_dir)
    return Path(os.environ.get("AEGIS_DATA_DIR", DEFAULT_DATA_ROOT)) / DATA_FOLDERS[dataset]


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: Dataset = "kermany"
    data_dir: str | None = None  # default: $AEGIS_DATA_DIR/<dataset folder> or ../shared/data/<dataset folder>
    image_size: int = 64
    channels: int = 1
    val_fraction: float = 0.15
    limit_per_split: int | None = None  # tiny runs: at most this many images per split
    seed: int = 0
    # the validation split's seed (None: `seed`): seeds of one recipe that share it are compared, and one of them
    # picked, on the same validation images
    split_seed: int | None = None
    # classifier (paper: ImageNet-pretrained ResNet-50 / VGG-16; CPU preset: ResNet-18 from scratch)
    backbone: str = "resnet18"
    taps: tuple[int, ...] | None = None  # None: the backbone's default taps (models.networks.BACKBONES)
    pretrained: str | None = None  # local torchvision state dict; nothing is downloaded
    clf_epochs: int = 20
    clf_batch_size: int = 64
    clf_lr: float = 2e-3
    clf_weight_decay: float = 5e-4
    cushion_aug_prob: float = 0.5  # train on Cushioned images this often, so the Cushion costs ~nothing
    # adversarial training of the classifier (Madry et al.): a Shield on the features of a non-robust backbone reads
    # features the attacker controls; 0 = standard training (the paper's)
    clf_adv_eps: float = 0.0
    clf_adv_steps: int = 5
    clf_adv_fraction: float = 0.5  # pgd_at: share of each batch replaced by its PGD version (the rest stays clean)
    clf_objective: ClassifierObjective = "pgd_at"  # trades / mart attack the whole batch (training.options)
    clf_beta: float = 6.0  # trades / mart: weight of the KL robustness term (both papers' default)
    # exponential moving average of the classifier's weights (and BatchNorm statistics), decay per step; 0 = off. The
    # average is what is validated and kept: it smooths the last epochs' robust-overfitting swings (Rice et al. 2020)
    clf_ema: float = 0.0
    # Cushion (paper: JPEG quality 80)
    cushion: dict[str, Any] = field(default_factory=lambda: {"kind": "jpeg", "quality": 80})
    # Shield adversarial training (paper Eq. 3/4)
    shield_width: int = 32
    shield_kind: ShieldKind = "per_class"  # or "shared_trunk": one tap trunk, a head per class (cheaper to serve)
    shield_epochs: int = 10
    shield_batch_size: int = 64
    shield_lr: float = 1e-3
    eps_start: float = 1 / 256  # epsilon curriculum 1/256 -> 16/256 (paper §4.1)
    eps_end: float = 16 / 256
    curriculum_epochs: int = 5  # epochs to ramp eps_start -> eps_end, then hold
    # after the ramp: "curriculum" holds eps_end (the paper's); "uniform" draws each batch's budget from the grey
    # levels eps_start..eps_end, so the Shields also learn to reject small perturbations (an attacker picks the budget)
    eps_schedule: EpsSchedule = "curriculum"
    attack_steps: int = 7
    attack_step_size: float | None = None  # None: 2.5 * eps / attack_steps (engine default)
    # "wb": -S^t + J_cw (the evaluation's WB attack); "n1": CE on the (N+1)-class wrapper (the audit's wb_n1);
    # "shield": the paper's -S^t; "ce": the classifier's CE alone (a conventional attack, blind to the Shields);
    # "a+b": alternate batch by batch
    attack_objective: str = "wb"
    attack_direction: Direction = "sum"  # engine PGDConfig.direction
    attack_kappa: float = 10.0
    # the training attacker's BPDA backward through the Cushion: "identity" (the paper's), "diffjpeg" (the gradient
    # of a differentiable JPEG, the audit's wb_diffjpeg; JPEG Cushions only) or "mixed" (alternate batch by batch,
    # so the Shields see both kinds of attack)
    attack_bpda: BpdaBackward = "identity"
    # "mixed": every other batch (after the BPDA alternation), the attacker's gradient goes through input diversity
    # and a Gaussian filter (the transfer attack's DI + TI), so the Shields also see smooth, low-frequency
    # perturbations like those a transfer attack makes; "none": plain gradients only
    attack_smoothing: Smoothing = "none"
    # stage 3 (optional): classifier + Shields fine-tuned together against the (N+1)-class attacker (training.joint)
    joint_epochs: int = 0
    joint_lr: float = 1e-4
    joint_adv_weight: float = 1.0  # weight of -log(p_right + p_reject) on the attacked images
    # the Shield logit at which the training attacker and the joint stage put the accept/reject boundary: 0 for learned
    # Shields (their BCE's boundary); for margin Shields a log-odds of the predicted class (2.2: ~90% confidence)
    operating_logit: float = 0.0
    # calibration
    clean_rejection_rate: float = 0.05
    # evaluation written into the bundle (CPU scale by default; the paper uses the whole test split)
    eval_images: int = 150
    eval_batch_size: int = 50
    eval_steps: int = 100
    # bundle
    name: str = "aegis-kermany-resnet18-64"
    version: str = "1.0.0"
    threads: int | None = None

    def __post_init__(self):
        check_literals(self)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not set(self.attack_objective.split("+")) <= set(get_args(ObjectiveName)):
            raise ValueError(f"attack_objective must be one of {', '.join(map(repr, get_args(ObjectiveName)))} or "
                             f"several joined by '+', got {self.attack_objective!r}")
        if self.attack_bpda != "identity" and self.cushion.get("kind") != "jpeg":
            raise ValueError(f"attack_bpda={self.attack_bpda!r} needs a JPEG Cushion, got {self.cushion}")
        if self.clf_objective != "pgd_at" and not self.clf_adv_eps > 0:
            raise ValueError(f"clf_objective={self.clf_objective!r} is adversarial training: set clf_adv_eps > 0")
        if self.operating_logit and self.shield_kind != "margin":
            raise ValueError("operating_logit moves the accept/reject boundary of margin Shields only; learned "
                             "Shields are trained with theirs at 0")
        if not 0 <= self.clf_ema < 1:
            raise ValueError(f"clf_ema is a decay per step in [0, 1), got {self.clf_ema}")
        if not 0 < self.eps_start <= self.eps_end:
            raise ValueError(f"need 0 < eps_start <= eps_end, got {self.eps_start}, {self.eps_end}")

    @property
    def data_seed(self) -> int:
        """The seed of the validation split and of `limit_per_split`'s subsets."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def resolved_data_dir(self) -> Path:
        return dataset_dir(self.dataset, self.data_dir)

    def eps_at(self, epoch: int) -> float:
        """Linear curriculum from eps_start (epoch 0) to eps_end (epoch curriculum_epochs - 1), then held."""
        if self.curriculum_epochs <= 1:
            return self.eps_end
        fraction = min(epoch / (self.curriculum_epochs - 1), 1.0)
        return self.eps_start + fraction * (self.eps_end - self.eps_start)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any) -> Any:
    """Parse a command-line override string into the field's type (JSON first, then plain string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if name == "taps" and value is not None:
        value = tuple(value)
    return value


def load_config(preset: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A preset name (`training/presets/<name>.json`) or JSON path, then `key=value` overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        path = Path(preset) if str(preset).endswith(".json") else PRESETS_DIR / f"{preset}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise FileNotFoundError(f"no preset {preset!r}; known presets: {known}")
        values.update(json.loads(path.read_text()))
        values.pop("_comment", None)
    values.update(overrides or {})
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
    return replace(TrainConfig(), **{k: _coerce(k, v) for k, v in values.items()})
