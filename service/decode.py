"""Bytes -> a decoded image, by magic bytes (PNG, JPEG, DICOM Part 10), with size guards and clear refusals.

The format is sniffed from the bytes, never trusted from a file name; a declared content type that contradicts the
bytes is refused (415). Outputs are 8-bit Pillow images for `models.imaging.prepare_image`; 8-bit PNG/JPEG images
are passed on as decoded, so the service sees exactly the pixels that `PIL.Image.open` gives the offline pipeline.

Conversions to 8 bits, in integer arithmetic or on strips of rows (memory per request: the decoded image and one
8-bit copy, never a float64 copy of the whole frame; docs/security.md "Memory per request"):
- 16-bit PNG (`I;16`, `I`): linear, 0..65535 -> 0..255 (round half up), exactly `(2 v + 257) // 514`.
- DICOM grayscale: stored values -> Modality LUT (Rescale Slope/Intercept or LUT) -> VOI (the first Window
  Center/Width, LINEAR / LINEAR_EXACT / SIGMOID, or a VOI LUT) mapped from its output range onto 0..255. Without a VOI,
  8-bit unsigned data without rescale is kept as is and anything else is min-max scaled. MONOCHROME1 is inverted
  (high = white) so that the model always sees MONOCHROME2. Colour DICOM (RGB, YBR) is converted to RGB.
- Multi-frame DICOM is refused (422): send one frame. So is a DICOM SOP class without pixel data (a Structured
  Report, an Encapsulated PDF: `NotAnImage`), and compressed pixel data without an installed decoder (415,
  `UnsupportedTransferSyntax`; the `dicom-codecs` extra installs pylibjpeg and python-gdcm decoders).

Error messages about DICOM never quote element values: they could contain patient data (a Photometric Interpretation
is named only when it is one of the standard's defined terms).

Pixel limits: `max_pixels` for PNG/JPEG (a 64-224 px model needs no 50-megapixel photo), `max_dicom_pixels` for
DICOM (the largest detectors of the modality); both are checked on the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from service.errors import (NotAnImage, TooManyPixels, UndecodableImage, UnsupportedImage, UnsupportedMediaType,
                            UnsupportedTransferSyntax)

ImageFormat = Literal["png", "jpeg", "dicom"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"

MEDIA_TYPES: dict[str, ImageFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dicom",
}
GENERIC_MEDIA_TYPES = frozenset({"", "application/octet-stream"})
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_DICOM_PIXELS = 6000 * 6000
STRIP_PIXELS = 1 << 18  # elements per strip of the row-wise conversions: a few MB of temporaries
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
PHOTOMETRIC_TERMS = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
                               "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # an 8-bit Pillow mode; `prepare_image` converts it to L or RGB
    format: ImageFormat
    width: int
    height: int


def sniff(data: bytes) -> ImageFormat | None:
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    return None


def check_media_type(media_type: str | None) -> ImageFormat | None:
    """The format a declared media type promises (None for a generic type); 415 for anything else."""
    media = (media_type or "").split(";")[0].strip().lower()
    if media in GENERIC_MEDIA_TYPES:
        return None
    if media not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"content type {media!r} is not accepted; send image/png, image/jpeg or "
                                   "application/dicom (raw body or multipart field 'file')")
    return MEDIA_TYPES[media]


def decode_image(data: bytes, media_type: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_dicom_pixels: int = DEFAULT_MAX_DICOM_PIXELS) -> DecodedImage:
    """Decode `data`; raises the `service.errors` domain errors (413/415/422) for anything it cannot accept."""
    declared = check_media_type(media_type)
    if not data:
        raise UndecodableImage("the image is empty (0 bytes)")
    found = sniff(data)
    if found is None:
        raise UnsupportedMediaType("unrecognised image bytes: expected PNG, JPEG or DICOM Part 10 (with the 128-byte "
                                   "preamble and 'DICM')")
    if declared is not None and declared != found:
        raise UnsupportedMediaType(f"content type says {declared} but the bytes are {found}")
    if found == "dicom":
        return _decode_dicom(data, max_dicom_pixels)
    return _decode_pillow(data, found, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"invalid image size {width} x {height}")
    if width * height * frames > max_pixels:
        raise TooManyPixels(f"image of {width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
                            + f" pixels exceeds the limit of {max_pixels} pixels")


def _decode_pillow(data: bytes, fmt: ImageFormat, max_pixels: int) -> DecodedImage:
    name = fmt.upper()
    try:
        image = Image.open(io.BytesIO(data), formats=[name])
        # the header gives the size before any pixel is decoded: the decompression-bomb guard
        _check_pixels(image.width, image.height, max_pixels)
        image.load()
    except (TooManyPixels, UndecodableImage):
        raise
    except Image.DecompressionBombError as error:
        raise TooManyPixels(f"{name} rejected as a decompression bomb: {error}") from None
    except Exception as error:  # noqa: BLE001 - any Pillow failure on untrusted bytes is the client's bad input
        raise UndecodableImage(f"could not decode the {name} image: {type(error).__name__}: {error}") from None
    return DecodedImage(_to_8bit(image, name), fmt, image.width, image.height)


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit and 32-bit integer images -> 8-bit `L`; every 8-bit mode is passed on untouched (see module doc)."""
    if image.mode in SIXTEEN_BIT_MODES:
        width, height = image.size
        out = np.empty((height, width), np.uint8)
        step = _strip_rows(width)
        for top in range(0, height, step):  # strips: no full-size copy beside Pillow's own
            strip = np.asarray(image.crop((0, top, width, min(height, top + step))))
            if strip.size and (strip.min() < 0 or strip.max() > 65535):
                raise UnsupportedImage(f"{name} integer pixels outside 0..65535 are not supported")
            wide = strip.astype(np.uint32)  # in place: floor(v * 255 / 65535 + 0.5) = floor(v / 257 + 0.5)
            wide *= 2
            wide += 257
            wide //= 514
            out[top:top + step] = wide
        return Image.fromarray(out, mode="L")
    if image.mode not in EIGHT_BIT_MODES:
        raise UnsupportedImage(f"{name} image mode {image.mode} is not supported")
    return image


def _round_uint8(values: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _strip_rows(row_elements: int) -> int:
    return max(1, STRIP_PIXELS // max(1, row_elements))


def _rows_to_uint8(array: np.ndarray, to_scaled) -> np.ndarray:
    """`_round_uint8(to_scaled(array))`, strip by strip of rows: float64 temporaries of a few MB, not of the frame.
    `to_scaled` must work element-wise (it sees one strip at a time)."""
    out = np.empty(array.shape, np.uint8)
    step = _strip_rows(int(np.prod(array.shape[1:], dtype=np.int64)))
    for top in range(0, len(array), step):
        out[top:top + step] = _round_uint8(to_scaled(array[top:top + step]))
    return out


# --- DICOM ------------------------------------------------------------------------------------------------------------

def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        raise UndecodableImage("not a valid DICOM Part 10 file") from None
    except Exception as error:  # noqa: BLE001 - never quote pydicom's message: it may carry element values
        raise UndecodableImage(f"could not parse the DICOM file ({type(error).__name__})") from None
    try:
        return _dicom_image(ds, max_pixels)
    except (TooManyPixels, UndecodableImage, UnsupportedImage, UnsupportedMediaType):
        raise
    except Exception as error:  # noqa: BLE001
        raise UndecodableImage(f"could not decode the DICOM pixel data ({type(error).__name__})") from None


def _dicom_int(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None:
        raise UndecodableImage(f"DICOM attribute {keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UndecodableImage(f"DICOM attribute {keyword} is not an integer") from None


def _dicom_image(ds, max_pixels: int) -> DecodedImage:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        _refuse_without_pixels(ds)
    rows, columns = _dicom_int(ds, "Rows"), _dicom_int(ds, "Columns")
    frames = _dicom_int(ds, "NumberOfFrames", 1)
    _check_pixels(columns, rows, max_pixels, max(frames, 1))
    if frames > 1:
        raise UnsupportedImage(f"multi-frame DICOM ({frames} frames) is not supported: send one frame")
    _check_transfer_syntax(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = _dicom_int(ds, "SamplesPerPixel", 1)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and samples == 1:
        return DecodedImage(Image.fromarray(_dicom_gray(ds, photometric), mode="L"), "dicom", columns, rows)
    if samples == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        array = ds.pixel_array  # pydicom converts YBR to RGB
        if array.dtype != np.uint8:
            high = float(2 ** _dicom_int(ds, "BitsStored") - 1)
            array = _rows_to_uint8(array, lambda rows: _scale(rows.astype(np.float64), 0.0, high))
        return DecodedImage(Image.fromarray(np.ascontiguousarray(array), mode="RGB"), "dicom", columns, rows)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(ds.pixel_array, ds)
        high = float(2 ** (8 if rgb.dtype == np.uint8 else 16) - 1)
        rgb = _rows_to_uint8(rgb, lambda rows: _scale(rows.astype(np.float64), 0.0, high))
        return DecodedImage(Image.fromarray(rgb, mode="RGB"), "dicom", columns, rows)
    # name the value only when it is a defined term of the standard: anything else could be patient data
    named = photometric if photometric in PHOTOMETRIC_TERMS else "(missing)" if not photometric else "(non-standard)"
    raise UnsupportedImage(f"DICOM photometric interpretation {named} with {samples} samples per pixel is not "
                           "supported (MONOCHROME1, MONOCHROME2, RGB, YBR_FULL(_422), YBR_ICT, YBR_RCT, PALETTE COLOR)")


def _check_transfer_syntax(ds) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not uid:
        raise UndecodableImage("the DICOM file meta has no Transfer Syntax UID")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnsupportedTransferSyntax(f"DICOM transfer syntax {uid} ({uid.name}) has no pixel data decoder"
                                        ) from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"DICOM transfer syntax {uid} ({uid.name}) is compressed and no decoder plugin for it is installed "
            "(install pylibjpeg with pylibjpeg-libjpeg / pylibjpeg-openjpeg, or python-gdcm), or send uncompressed "
            "or JPEG-baseline DICOM")


def _refuse_without_pixels(ds) -> None:
    """No pixel data: an image SOP class missing its pixels is broken; any other SOP class is not an image."""
    from pydicom.uid import UID

    sop_class = UID(str(ds.get("SOPClassUID", "")))
    name = sop_class.name if sop_class.name != str(sop_class) else ""
    if not name or "Image" in name:
        raise UndecodableImage("the DICOM file has no pixel data")
    # the name first: a C-STORE Error Comment keeps 64 characters
    raise NotAnImage(f"{name} is not an image: nothing to diagnose (DICOM SOP class {sop_class})")


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax whose pixel data pydicom can decode here (uncompressed, and compressed ones whose
    decoder plugin is installed): what the DICOM node offers, so that senders convert anything else."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes, UID

    found = []
    for uid in map(UID, AllTransferSyntaxes):
        try:
            if get_decoder(uid).is_available:
                found.append(str(uid))
        except NotImplementedError:
            continue
    return found


def dicom_uids(data: bytes) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) of a DICOM Part 10 file, None where unreadable; the pixels are not read."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        uids = (ds.get("SOPClassUID"), ds.get("SOPInstanceUID"))
    except Exception:  # noqa: BLE001 - unreadable headers: decode_image gives the reason
        return None, None
    return tuple(str(u) if u else None for u in uids)  # type: ignore[return-value]


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not np.isfinite(values).all():
        raise UndecodableImage("the DICOM pixel data contains NaN or infinite values")
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _window_range(ds) -> tuple[float, float]:
    """The output range of pydicom's `apply_windowing` (DICOM PS3.3 C.11.2.1.2: the modality output range)."""
    bits = _dicom_int(ds, "BitsStored")
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif _dicom_int(ds, "PixelRepresentation", 0) == 0:
        low, high = 0.0, float(2 ** bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high


def _dicom_gray(ds, photometric: str) -> np.ndarray:
    """Stored values -> Modality LUT -> VOI -> 8 bits, strip by strip (each step is element-wise given `ds`)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = ds.pixel_array
    if stored.ndim != 2:
        raise UnsupportedImage(f"expected one 2-D grayscale frame, got pixel array of shape {stored.shape}")
    head = stored[:1]
    rescaled = apply_modality_lut(head, ds) is not head and ("RescaleSlope" in ds or "ModalityLUTSequence" in ds)
    if ds.get("VOILUTSequence"):
        high = float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        gray = _rows_to_uint8(stored, lambda rows: _scale(
            apply_voi_lut(apply_modality_lut(rows, ds), ds, prefer_lut=True).astype(np.float64), 0.0, high))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        low, high = _window_range(ds)
        gray = _rows_to_uint8(stored, lambda rows: _scale(
            apply_voi_lut(apply_modality_lut(rows, ds), ds, prefer_lut=False).astype(np.float64), low, high))
    elif stored.dtype == np.uint8 and not rescaled:
        gray = stored.astype(np.uint8, copy=True)
    else:  # min-max over the whole frame: one pass for the range, one to scale
        step = _strip_rows(stored.shape[1])
        ranges = [(float(v.min()), float(v.max())) for v in
                  (np.asarray(apply_modality_lut(stored[top:top + step], ds), dtype=np.float64)
                   for top in range(0, len(stored), step))]
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        gray = _rows_to_uint8(stored, lambda rows: _scale(
            np.asarray(apply_modality_lut(rows, ds), dtype=np.float64), low, high))
    return 255 - gray if photometric == "MONOCHROME1" else gray
