"""Bring a decoded image to the model's input geometry: channel count and size, as uint8 H x W x C.

Shared by the training data loaders and the service so that both resize and convert the same way; the Cushion runs
after this step, at the model's resolution.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

ResizePolicy = Literal["stretch", "center_crop"]


class InputSpec(BaseModel):
    """The model's input: `channels` x `height` x `width`, float32 in [0, 1] after the Cushion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: Literal[1, 3]
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    resize: ResizePolicy = Field(
        "stretch",
        description="stretch: resize to height x width ignoring aspect (how the Kermany/APTOS sources were made); "
        "center_crop: resize the short side, then crop the centre",
    )


def prepare_image(image: Image.Image | np.ndarray, spec: InputSpec) -> np.ndarray:
    """Upright per EXIF orientation, then convert to the spec's channels (L or RGB) and size with Lanczos
    resampling; returns uint8 H x W x C. Camera JPEGs (fundus photographs) often store the pixels sideways and the
    rotation in EXIF; a model must see what the clinician sees."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 array, got {image.dtype}")
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    pil = image.convert("L" if spec.channels == 1 else "RGB")
    if spec.resize == "center_crop":
        scale = max(spec.width / pil.width, spec.height / pil.height)
        size = (max(spec.width, round(pil.width * scale)), max(spec.height, round(pil.height * scale)))
        if size != pil.size:
            pil = pil.resize(size, Image.Resampling.LANCZOS)
        left, top = (pil.width - spec.width) // 2, (pil.height - spec.height) // 2
        pil = pil.crop((left, top, left + spec.width, top + spec.height))
    elif pil.size != (spec.width, spec.height):
        pil = pil.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    array = np.asarray(pil, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array
