"""The defended model bundle: the contract between training, serving and anyone auditing the defence.

A bundle is a folder::

    manifest.json      this schema (versioned), with the sha256 of every other file
    aegis.onnx         one graph: input `image` float32 N x C x H x W in [0, 1], already resized and Cushioned;
                       outputs `logits` (N x K) and `shield_logits` (N x K, each class's Shield logit, high = clean)
    weights.pt         the torch state dicts (classifier + Shields) for white-box attacks and fine-tuning
    MODEL_CARD.md      intended use, data and attribution, metrics with their scale and command, limits

Schema 1.1 added `calibration.clean_logits`: per class, the distribution of the clean validation Shield logits its
threshold was calibrated on (quantiles and a histogram), so that a reader can place one image's logit among them.
1.0 bundles still load (the field is then empty). 1.1 also added `architecture.shield_kind` ("per_class", the
paper's, or "shared_trunk"; 1.0 bundles are per-class); 1.2 added "margin" (no Shield weights: the classifier's
own log-odds, the rejection-by-confidence baseline).

The decision rule, for an input `x` of any size:
    `u = cushion(prepare_image(x, input))`; `logits, s = aegis.onnx(u / 255)`; `k = argmax(logits)`;
    accept iff `s[k] >= thresholds[classes[k]]`.

`load_bundle` refuses a bundle whose schema is wrong, whose major schema version is unknown, or whose files do not
match their recorded hashes. This module needs no torch.

Integrity: the bundle's **digest** is the sha256 of its canonical manifest (the JSON object re-serialised with sorted
keys, separators `,` and `:`, UTF-8, no ASCII escaping); the manifest holds the sha256 of every other file, so the
digest covers them all, and any edit (a threshold, a file) changes it. Anyone can recompute it:

    python -c "import hashlib, json, sys; m = json.load(open(sys.argv[1])); print(hashlib.sha256(json.dumps(m,
        sort_keys=True, separators=(',', ':'), ensure_ascii=False).encode()).hexdigest())" DIR/manifest.json

An optional detached **signature** (`bundle.sig` next to the manifest, not listed in it: base64 of an Ed25519
signature of `SIGNATURE_CONTEXT + digest`) is checked when a public key is given (`python -m models.signing`
makes keys and signs; the service takes the key from AEGIS_BUNDLE_PUBLIC_KEY_FILE). `aegis.onnx` is never touched.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.cushion import Cushion
from models.imaging import InputSpec

SCHEMA_VERSION = "1.2"
MANIFEST = "manifest.json"
SIGNATURE_FILE = "bundle.sig"
SIGNATURE_CONTEXT = b"medical-aegis bundle sha256:"
ONNX_FILE = "aegis.onnx"
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "MODEL_CARD.md"
REQUIRED_FILES = (ONNX_FILE, CARD_FILE)
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default"


class BundleError(ValueError):
    """A bundle that cannot be trusted or used: missing files, bad schema, hash mismatch."""


class OnnxSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = ONNX_FILE
    input: str = "image"
    outputs: tuple[str, str] = ("logits", "shield_logits")
    opset: int = Field(17, ge=11)


class ArchitectureSpec(BaseModel):
    """Enough to rebuild the torch model from `weights.pt` (models.networks.build_aegis)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str
    taps: tuple[int, ...] = Field(description="1-indexed residual blocks (ResNet) or ReLU layers (VGG) fed to Shields")
    tap_names: tuple[str, ...] = ()
    shield_width: int | None = Field(gt=0, description="the learned Shields' width; null for margin Shields")
    # "per_class": one Shield network per class (the paper's); "shared_trunk": one tap trunk, a head per class
    # (models.networks.SharedTrunkShields); "margin" (schema 1.2): no Shield weights, each class's Shield logit is
    # the classifier's log-odds of that class (models.networks.MarginShields). Schema 1.1; absent in 1.0 bundles,
    # which are all per-class.
    shield_kind: Literal["per_class", "shared_trunk", "margin"] = "per_class"


QUANTILE_LEVELS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975, 0.99, 1.0)


class LogitDistribution(BaseModel):
    """One class's clean Shield logits (the calibration images routed to that Shield), summarised: quantiles at
    `levels` and a histogram (`counts[i]` logits in [`edges[i]`, `edges[i + 1]`), the last bin closed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(ge=1, description="clean images summarised")
    levels: tuple[float, ...] = Field(min_length=2)
    quantiles: tuple[float, ...] = Field(min_length=2)
    edges: tuple[float, ...] = Field(min_length=2)
    counts: tuple[int, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> LogitDistribution:
        if len(self.levels) != len(self.quantiles) or np.any(np.diff(self.levels) <= 0) \
                or not 0 <= self.levels[0] <= self.levels[-1] <= 1 or np.any(np.diff(self.quantiles) < 0):
            raise ValueError("quantiles must be non-decreasing values at increasing levels in [0, 1]")
        if len(self.edges) != len(self.counts) + 1 or np.any(np.diff(self.edges) <= 0) \
                or min(self.counts) < 0 or sum(self.counts) != self.n:
            raise ValueError("the histogram needs increasing edges, one more than its counts, counts summing to n")
        return self

    @classmethod
    def of(cls, logits: np.ndarray, bins: int = 20) -> LogitDistribution:
        values = np.asarray(logits, dtype=np.float64).ravel()
        if len(values) == 0 or not np.isfinite(values).all():
            raise ValueError("a logit distribution needs at least one value, all finite")
        counts, edges = np.histogram(values, bins=bins)
        return cls(n=len(values), levels=QUANTILE_LEVELS,
                   quantiles=tuple(float(q) for q in np.quantile(values, QUANTILE_LEVELS)),
                   edges=tuple(float(e) for e in edges), counts=tuple(int(c) for c in counts))

    def quantile(self, level: float) -> float:
        """The stored quantile at `level` (one of `levels`)."""
        return self.quantiles[self.levels.index(level)]


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    clean_rejection_rate: float = Field(gt=0.0, lt=1.0)
    split: str
    counts: dict[str, int] = Field(default_factory=dict, description="clean images routed to each class's Shield")
    clean_logits: dict[str, LogitDistribution] = Field(
        default_factory=dict, description="per class, the distribution of those images' Shield logits (schema 1.1; "
                                          "empty in older bundles)")

    @model_validator(mode="after")
    def _counts_match(self) -> CalibrationSpec:
        for name, distribution in self.clean_logits.items():
            if name in self.counts and self.counts[name] != distribution.n:
                raise ValueError(f"clean_logits of {name} summarise {distribution.n} images, counts says "
                                 f"{self.counts[name]}")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: str = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    classes: tuple[str, ...] = Field(min_length=2)
    input: InputSpec
    cushion: Cushion
    onnx: OnnxSpec = OnnxSpec()
    thresholds: dict[str, float] = Field(description="per class: accept iff that class's Shield logit >= threshold")
    calibration: CalibrationSpec
    architecture: ArchitectureSpec
    training: dict[str, Any] = Field(default_factory=dict, description="the resolved training config")
    data: dict[str, Any] = Field(default_factory=dict, description="dataset name, fingerprint and counts")
    metrics: dict[str, Any] = Field(default_factory=dict, description="measured figures with scale and command")
    reports: dict[str, str] = Field(default_factory=dict, description="extra files, e.g. security_report.json")
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every file but the manifest")

    @field_validator("schema_version")
    @classmethod
    def _known_major_version(cls, value: str) -> str:
        if value.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(f"unsupported bundle schema version {value!r}; this code reads {SCHEMA_VERSION}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique, got {list(self.classes)}")
        if set(self.thresholds) != set(self.classes):
            raise ValueError(f"thresholds must name exactly the classes {list(self.classes)}, "
                             f"got {sorted(self.thresholds)}")
        if self.calibration.clean_logits and set(self.calibration.clean_logits) != set(self.classes):
            raise ValueError(f"calibration.clean_logits must name exactly the classes {list(self.classes)}")
        return self

    def threshold(self, class_index: int) -> float:
        return self.thresholds[self.classes[class_index]]

    def threshold_array(self) -> np.ndarray:
        """The thresholds as float64 in class-index order (the order of the graph's outputs)."""
        return threshold_array(self.thresholds, self.classes)


def threshold_array(thresholds: dict[str, float], classes: tuple[str, ...]) -> np.ndarray:
    """Per-class thresholds {class: logit} as float64 in class-index order."""
    return np.array([thresholds[c] for c in classes], dtype=np.float64)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def bundle_digest(manifest_bytes: bytes) -> str:
    """sha256 hex of the canonical form of a manifest.json's content (see the module doc)."""
    return hashlib.sha256(canonical_json(json.loads(manifest_bytes))).hexdigest()


def signed_message(digest: str) -> bytes:
    """What the Ed25519 signature signs: a fixed context (no other message of this project looks alike) + digest."""
    return SIGNATURE_CONTEXT + digest.encode("ascii")


def verify_signature(digest: str, public_key_file: Path, signature_file: Path) -> None:
    """Raise BundleError unless `signature_file` holds a valid Ed25519 signature of the digest under the key."""
    import base64
    import binascii

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not signature_file.is_file():
        raise BundleError(f"the bundle has no signature ({signature_file} is missing) but a bundle public key is "
                          "configured: sign it with `python -m models.signing sign`, or remove the key setting")
    try:
        key = load_pem_public_key(Path(public_key_file).read_bytes())
    except (ValueError, TypeError) as error:
        raise BundleError(f"{public_key_file} is not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{public_key_file} is not an Ed25519 public key")
    try:
        signature = base64.b64decode(signature_file.read_text(encoding="ascii").strip(), validate=True)
        key.verify(signature, signed_message(digest))
    except (InvalidSignature, binascii.Error, UnicodeDecodeError, ValueError):
        raise BundleError(f"the bundle signature {signature_file} does not verify with {public_key_file}: the "
                          f"manifest or a file changed after signing, or another key signed it (digest {digest})"
                          ) from None


class Bundle:
    """A verified bundle on disk: `digest` (sha256 of the canonical manifest), `signature` (verified | unsigned)."""

    def __init__(self, root: Path, manifest: Manifest, digest: str = "", signature: str = "unsigned"):
        self.root = root
        self.manifest = manifest
        self.digest = digest
        self.signature = signature

    @property
    def onnx_path(self) -> Path:
        return self.root / self.manifest.onnx.file

    @property
    def weights_path(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def cushion(self):
        return self.manifest.cushion

    def model_card(self) -> str:
        return (self.root / CARD_FILE).read_text(encoding="utf-8")

    def report(self, key: str) -> Any | None:
        """A report file named in `manifest.reports` (JSON parsed, anything else as text), or None."""
        name = self.manifest.reports.get(key)
        if name is None:
            return None
        text = (self.root / name).read_text(encoding="utf-8")
        return json.loads(text) if name.endswith(".json") else text


def load_bundle(path: str | Path | None = None, *, public_key_file: str | Path | None = None,
                signature_file: str | Path | None = None) -> Bundle:
    """Load and verify a bundle folder (the embedded default bundle when `path` is None). With `public_key_file`
    (Ed25519, PEM) the bundle must also carry a valid signature (`signature_file`, default DIR/bundle.sig)."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} is missing")
    raw = manifest_path.read_bytes()
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as error:
        raise BundleError(f"{manifest_path} does not match the bundle schema {SCHEMA_VERSION}: {error}") from error
    for required in (*REQUIRED_FILES, manifest.onnx.file, *manifest.reports.values()):
        if required not in manifest.files:
            raise BundleError(f"{manifest_path} lists no hash for the required file {required}")
    for name, expected in manifest.files.items():
        file = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"bundle file names must be relative to the bundle, got {name!r}")
        if not file.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"bundle file {name} was modified: sha256 {actual} != manifest {expected}")
    digest = bundle_digest(raw)
    if public_key_file is None:
        return Bundle(root, manifest, digest, "unsigned")
    verify_signature(digest, Path(public_key_file), Path(signature_file) if signature_file else root / SIGNATURE_FILE)
    return Bundle(root, manifest, digest, "verified")


def write_manifest(root: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in `root` (but the manifest and its signature) into `manifest.files` and write manifest.json
    (a signature made before no longer verifies: sign again)."""
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE_FILE)
    }
    final = manifest.model_copy(update={"files": files})
    Manifest.model_validate(final.model_dump())  # re-run the validators on the final form
    (root / MANIFEST).write_text(final.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return final
