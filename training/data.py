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
from PIL import Image

from models.imaging import InputSpec, prepare_image

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
