"""decode.py against independent references: DICOM windowing formula, inversion, rescale; magic-byte sniffing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.decode import decode_image, sniff
from service.errors import TooManyPixels, UndecodableImage, UnsupportedImage, UnsupportedMediaType
from tests.service.conftest import encode
from tests.service.dicom_factory import make_dicom

RNG = np.random.default_rng(7)
PIXELS12 = RNG.integers(0, 4096, size=(48, 40), dtype=np.uint16)


def _linear_window(x: np.ndarray, center: float, width: float, y_min: float, y_max: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, written out independently of the service."""
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * (y_max - y_min) + y_min
    y = np.where(x <= center - 0.5 - (width - 1) / 2, y_min, y)
    return np.where(x > center - 0.5 + (width - 1) / 2, y_max, y)


def _to_uint8(y: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.floor(np.clip((y - low) / (high - low) * 255, 0, 255) + 0.5).astype(np.uint8)


def _pixels(decoded) -> np.ndarray:
    return np.asarray(decoded.image)


def test_sniffing_uses_magic_bytes_only():
    png = encode(np.zeros((4, 4), np.uint8))
    assert sniff(png) == "png" and sniff(encode(np.zeros((4, 4), np.uint8), "JPEG")) == "jpeg"
    assert sniff(make_dicom(np.zeros((4, 4), np.uint8))) == "dicom"
    assert sniff(b"BM" + png) is None and sniff(b"") is None


def test_narrow_window_on_12_bit_data_follows_the_dicom_formula():
    center, width = 1500.0, 800.0
    decoded = decode_image(make_dicom(PIXELS12, bits_stored=12, window=(center, width)), "application/dicom")
    expected = _to_uint8(_linear_window(PIXELS12.astype(np.float64), center, width, 0, 4095), 0, 4095)
    np.testing.assert_array_equal(_pixels(decoded), expected)
    assert (decoded.format, decoded.width, decoded.height) == ("dicom", 40, 48)


def test_rescale_then_window_and_monochrome1_inversion():
    slope, intercept, center, width = 2.0, -1024.0, 400.0, 2000.0
    data = make_dicom(PIXELS12, bits_stored=12, slope=slope, intercept=intercept, window=(center, width),
                      photometric="MONOCHROME1")
    hu = PIXELS12 * slope + intercept
    low, high = intercept, 4095 * slope + intercept
    expected = 255 - _to_uint8(_linear_window(hu, center, width, low, high), low, high)
    np.testing.assert_array_equal(_pixels(decode_image(data)), expected)


def test_no_window_16_bit_is_min_max_scaled_and_8_bit_is_kept():
    decoded = decode_image(make_dicom(PIXELS12, bits_stored=12))
    lo, hi = PIXELS12.min(), PIXELS12.max()
    np.testing.assert_array_equal(_pixels(decoded), _to_uint8(PIXELS12.astype(np.float64), lo, hi))
    eight = RNG.integers(10, 200, size=(20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(_pixels(decode_image(make_dicom(eight))), eight)


def test_sixteen_bit_png_is_scaled_linearly_to_eight_bits():
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    decoded = decode_image(encode(values), "image/png")
    assert decoded.image.mode == "L" and _pixels(decoded).tolist() == [[0, 1, 255, 128]]


def test_refusals_name_the_reason():
    with pytest.raises(UnsupportedMediaType, match="content type"):
        decode_image(b"x", "text/plain")
    with pytest.raises(UnsupportedMediaType, match="says dicom but the bytes are png"):
        decode_image(encode(np.zeros((4, 4), np.uint8)), "application/dicom")
    with pytest.raises(UndecodableImage, match="empty"):
        decode_image(b"", "image/png")
    with pytest.raises(TooManyPixels, match="exceeds the limit of 15 pixels"):
        decode_image(encode(np.zeros((4, 4), np.uint8)), max_pixels=15)
    with pytest.raises(UnsupportedImage, match="multi-frame"):
        decode_image(make_dicom(np.zeros((3, 4, 4), np.uint8), frames=3))
    with pytest.raises(UndecodableImage, match="no pixel data"):
        decode_image(make_dicom(None))


def test_dicom_errors_never_quote_element_values():
    data = make_dicom(np.zeros((8, 8), np.uint8))
    for cut in (140, 300, len(data) - 10):
        with pytest.raises((UndecodableImage, UnsupportedImage)) as info:
            decode_image(data[:cut])
        assert "Doe" not in info.value.message and "PID" not in info.value.message


def test_rgb_and_palette_images_are_passed_to_prepare_unchanged():
    rgb = RNG.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    decoded = decode_image(encode(rgb))
    assert decoded.image.mode == "RGB" and np.array_equal(_pixels(decoded), rgb)
    palette = Image.fromarray(rgb).convert("P")
    import io

    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).image.mode == "P"
