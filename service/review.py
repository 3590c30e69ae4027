"""What the review page shows of one diagnosis besides the verdict: the uploaded image as the service decoded it
(DICOM after its VOI window, upright per EXIF) and the model's input after the Cushion, as PNG data URLs, and the
bundle's documents (model card, security report) as Markdown or HTML.

The model input is the very row the ONNX graph saw (`Diagnosis.model_input`), turned back into pixels; nothing here
runs the pipeline a second time.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from markdown_it import MarkdownIt
from PIL import Image, ImageOps

from service.decode import DecodedImage
from service.pipeline import DefensePipeline

PREVIEW_MAX_SIDE = 512  # the page shows the upload at most ~400 px wide; a full DICOM would be megabytes of base64
_MARKDOWN = MarkdownIt("js-default")  # CommonMark + tables, raw HTML escaped: a bundle's text cannot inject markup


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def uploaded_preview(decoded: DecodedImage) -> str:
    """The decoded upload, upright, in L or RGB, at most PREVIEW_MAX_SIDE pixels on its long side."""
    image = ImageOps.exif_transpose(decoded.image)
    image = image.convert("L" if image.mode in ("1", "L", "LA", "La") else "RGB")
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), Image.Resampling.LANCZOS)
    return png_data_url(image)


def model_input_preview(row: np.ndarray) -> str:
    """The Cushioned model input (C x H x W float row) at its own resolution."""
    pixels = DefensePipeline.from_input(row)
    return png_data_url(Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels))


def previews(decoded: DecodedImage, row: np.ndarray) -> dict[str, str]:
    return {"uploaded": uploaded_preview(decoded), "model_input": model_input_preview(row)}


def markdown_to_html(text: str) -> str:
    """An HTML fragment of a Markdown document, its raw HTML escaped (the page shows it in a dialog)."""
    return _MARKDOWN.render(text)
