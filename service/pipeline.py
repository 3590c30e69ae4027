"""The defended decision, decode-free and HTTP-free: prepare -> Cushion -> (batched) ONNX graph -> Shield decision.

This is the bundle's decision rule (`models.bundle`), with the same `models.imaging.prepare_image` and the same Cushion
object that training used, so that the service's bytes equal the training pipeline's bytes:

    u = cushion(prepare_image(image, manifest.input))          uint8 H x W x C
    x = u.transpose(2, 0, 1) / 255                              float32 C x H x W, one row of the ONNX batch
    logits, s = aegis.onnx(x);  k = argmax(logits)
    accept iff s[k] >= manifest.thresholds[classes[k]]

No torch, no FastAPI here: `service.api` feeds it decoded images and `service.batching` runs the ONNX graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from models.bundle import Bundle
from models.imaging import prepare_image
from service.errors import UnsupportedImage

Decision = Literal["accept", "reject"]


@dataclass(frozen=True)
class Verdict:
    """One image's answer. `timings` holds seconds per stage."""

    diagnosis: str
    class_index: int
    probabilities: dict[str, float]
    decision: Decision
    shield_logit: float
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.decision == "accept"


class DefensePipeline:
    """The bundle's decision rule in three steps: `preprocess` (per image), a batched graph call, `decide`."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.cushion = bundle.cushion
        self.classes = tuple(self.manifest.classes)
        self.thresholds = self.manifest.threshold_array()

    def preprocess(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Image -> (model input row float32 C x H x W, timings {prepare, cushion})."""
        t0 = time.perf_counter()
        try:
            prepared = prepare_image(image, self.manifest.input)
        except (OSError, ValueError, TypeError) as error:
            raise UnsupportedImage(f"the image cannot be converted to the model's input: {error}") from None
        t1 = time.perf_counter()
        cushioned = self.cushion(prepared)
        t2 = time.perf_counter()
        return self.to_input(cushioned), {"prepare": t1 - t0, "cushion": t2 - t1}

    @staticmethod
    def to_input(cushioned: np.ndarray) -> np.ndarray:
        """Cushioned uint8 H x W x C -> float32 C x H x W in [0, 1]."""
        return np.ascontiguousarray(cushioned.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)

    @staticmethod
    def from_input(row: np.ndarray) -> np.ndarray:
        """The inverse of `to_input`: a model input row back to the Cushioned uint8 H x W x C (exact: u / 255 in
        float32 rounds back to u)."""
        return np.rint(np.asarray(row, dtype=np.float32) * np.float32(255.0)).astype(np.uint8).transpose(1, 2, 0)

    def decide(self, logits: np.ndarray, shield_logits: np.ndarray, timings: dict[str, float] | None = None) -> Verdict:
        """One row of the graph's outputs -> the Verdict."""
        logits = np.asarray(logits, dtype=np.float64)
        shifted = np.exp(logits - logits.max())
        probabilities = shifted / shifted.sum()
        k = int(np.argmax(logits))
        shield = float(shield_logits[k])
        threshold = float(self.thresholds[k])
        return Verdict(
            diagnosis=self.classes[k],
            class_index=k,
            probabilities={c: float(p) for c, p in zip(self.classes, probabilities)},
            decision="accept" if shield >= threshold else "reject",
            shield_logit=shield,
            threshold=threshold,
            timings=dict(timings or {}),
        )

    def warmup_input(self) -> np.ndarray:
        """A mid-grey image through the real Cushion: a 1-row batch for the warm-up inference."""
        spec = self.manifest.input
        grey = np.full((spec.height, spec.width, spec.channels), 128, dtype=np.uint8)
        return self.to_input(self.cushion(grey))[None]
