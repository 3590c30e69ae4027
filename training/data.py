"""Datasets from local paths only: the shared Kermany / APTOS layouts and the original Kaggle folders.

- Kermany (`labels.csv` with `path,label,split,patient_id`), or Kaggle's `chest_xray/{train,val,test}/{NORMAL,
  PNEUMONIA}/*.jpeg` (Kaggle's tiny `val/` is merged into train: we carve our own validation split).
- APTOS 2019 (`labels.csv` with `path,label,split,dup_group`), or Kaggle's `train.csv` (`id_code,diagnosis`) +
  `train_images/`: grades 1-4 -> DR, 0 -> NO_DR; a deterministic 80/20 image-level split (no patient ids exist).

The validation split is carved from train and is group-disjoint (patients for Kermany, duplicate clusters for
APTOS), so thresholds and model selection never see test images or a patient that is also in training.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from models.cushion import CushionBase
from models.imaging import InputSpec, prepare_image
from training.config import TrainConfig

CLASSES = {"kermany": ("NORMAL", "PNEUMONIA"), "aptos": ("NO_DR", "DR")}
_KAGGLE_PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-")


@dataclass(frozen=True)
class Record:
    path: Path
    label: int
    group: str  # patient id (Kermany) or duplicate cluster (APTOS): never split across train and validation
    split: str  # "train" | "val" | "test"


def _read_labels_csv(root: Path, classes: tuple[str, ...], group_column: str) -> list[Record]:
    records = []
    with open(root / "labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["label"] not in classes:
                raise ValueError(f"{root / 'labels.csv'}: unknown label {row['label']!r}, expected one of {classes}")
            records.append(Record(root / row["path"], classes.index(row["label"]),
                                  row.get(group_column) or row["path"], row["split"]))
    return records


def _kaggle_chest_xray(root: Path, classes: tuple[str, ...]) -> list[Record]:
    base = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    records = []
    for split_dir in ("train", "val", "test"):
        for label, name in enumerate(classes):
            for path in sorted((base / split_dir / name).glob("*.jp*g")):
                match = _KAGGLE_PATIENT.match(path.name)
                group = next(g for g in match.groups() if g) if match else path.stem
                records.append(Record(path, label, group, "test" if split_dir == "test" else "train"))
    return records


def _kaggle_aptos(root: Path) -> list[Record]:
    records = []
    with open(root / "train.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            image = next((root / "train_images" / f"{row['id_code']}{ext}" for ext in (".png", ".jpg", ".jpeg")
                          if (root / "train_images" / f"{row['id_code']}{ext}").is_file()), None)
            if image is None:
                raise FileNotFoundError(f"no image for id {row['id_code']} under {root / 'train_images'}")
            # Deterministic image-level 80/20 split: APTOS' own test labels are private.
            bucket = int(hashlib.sha256(row["id_code"].encode()).hexdigest(), 16) % 5
            records.append(Record(image, int(int(row["diagnosis"]) > 0), row["id_code"],
                                  "test" if bucket == 0 else "train"))
    return records


def load_records(dataset: str, root: str | Path) -> list[Record]:
    """All records of a dataset folder, in one of the supported layouts; raises FileNotFoundError with the reason."""
    root = Path(root)
    if dataset not in CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(CLASSES)}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist (pass --data-dir or set AEGIS_DATA_DIR)")
    classes = CLASSES[dataset]
    if (root / "labels.csv").is_file():
        records = _read_labels_csv(root, classes, "patient_id" if dataset == "kermany" else "dup_group")
    elif dataset == "kermany":
        records = _kaggle_chest_xray(root, classes)
    elif (root / "train.csv").is_file():
        records = _kaggle_aptos(root)
    else:
        records = []
    if not records:
        raise FileNotFoundError(f"{root} holds no {dataset} images in a known layout (labels.csv, Kaggle folders)")
    return records


def split_validation(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """Move a group-disjoint, label-stratified `fraction` of the train records to split "val"."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if record.split == "train":
            groups[record.group].append(record)
    by_label: dict[int, list[str]] = defaultdict(list)
    for group, members in sorted(groups.items()):
        by_label[Counter(r.label for r in members).most_common(1)[0][0]].append(group)
    rng = random.Random(seed)
    val_groups: set[str] = set()
    for label, names in sorted(by_label.items()):
        rng.shuffle(names)
        wanted, taken = fraction * sum(len(groups[g]) for g in names), 0
        for name in names:
            if taken >= wanted:
                break
            val_groups.add(name)
            taken += len(groups[name])
    return [Record(r.path, r.label, r.group, "val") if r.split == "train" and r.group in val_groups else r
            for r in records]


def load_images(records: list[Record], spec: InputSpec) -> np.ndarray:
    """Decode and bring every record to the model geometry: uint8 N x H x W x C."""
    out = np.empty((len(records), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for i, record in enumerate(records):
        with Image.open(record.path) as image:
            out[i] = prepare_image(image, spec)
    return out


def fingerprint(records: list[Record]) -> str:
    """sha256 over (file name, label, split, file content hash) of every record, in order."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: (r.split, r.path.name)):
        digest.update(f"{record.path.name}|{record.label}|{record.split}|".encode())
        digest.update(hashlib.sha256(record.path.read_bytes()).digest())
    return digest.hexdigest()


@dataclass
class Split:
    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N

    def tensor(self) -> Tensor:
        """Float N x C x H x W in [0, 1] (not Cushioned)."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255


def load_split(records: list[Record], spec: InputSpec) -> Split:
    return Split(load_images(records, spec), np.array([r.label for r in records], dtype=np.int64))


def load_data(cfg: TrainConfig, names: tuple[str, ...] = ("train", "val", "test")) -> tuple[dict[str, Split], dict]:
    """The train / patient-disjoint val / test splits of a training config (only `names` loaded), and what the
    bundle says of them."""
    spec = InputSpec(channels=cfg.channels, height=cfg.image_size, width=cfg.image_size)
    records = split_validation(load_records(cfg.dataset, cfg.resolved_data_dir), cfg.val_fraction,
                               cfg.data_seed)
    splits, counts = {}, {}
    for name in names:
        chosen = [r for r in records if r.split == name]
        if cfg.limit_per_split:
            rng = np.random.default_rng(cfg.data_seed)
            chosen = [chosen[i] for i in sorted(rng.permutation(len(chosen))[:cfg.limit_per_split])]
        splits[name] = load_split(chosen, spec)
        counts[name] = {c: int((splits[name].labels == k).sum()) for k, c in enumerate(CLASSES[cfg.dataset])}
    used = [r for r in records if r.split in ("train", "val", "test")]
    info = {"dataset": cfg.dataset, "path": str(cfg.resolved_data_dir), "fingerprint": fingerprint(used),
            "counts": counts,
            "validation": f"patient/cluster-disjoint {cfg.val_fraction:.0%} of train, seed {cfg.data_seed}"}
    return splits, info


class TrainImages(Dataset):
    """Augmented training images; each is Cushioned with probability `cushion_prob` (so the Cushion costs ~nothing)."""

    def __init__(self, split: Split, cushion: CushionBase, cushion_prob: float, seed: int):
        self.split, self.cushion, self.cushion_prob = split, cushion, cushion_prob
        size = split.images.shape[1:3]
        # Geometry and exposure jitter: the Kermany test folder differs from train in acquisition, not anatomy.
        self.augment = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
            v2.ColorJitter(brightness=0.25, contrast=0.25),
        ])
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.augment(torch.from_numpy(self.split.images[i]).permute(2, 0, 1))
        if self.rng.random() < self.cushion_prob:
            image = torch.from_numpy(self.cushion(image.permute(1, 2, 0).numpy().copy())).permute(2, 0, 1)
        return image.float() / 255, int(self.split.labels[i])
