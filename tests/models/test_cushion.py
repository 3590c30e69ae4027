import hashlib
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from models.cushion import (BitDepthCushion, JpegCushion, NoCushion, RandomisedJpegCushion, TVCushion, jpeg_round_trip,
                            parse_cushion, to_uint8)
from tests.conftest import REPO


def _high_frequency_energy(image: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image[:, :, 0].astype(np.float64))))
    h, w = spectrum.shape
    yy, xx = np.ogrid[:h, :w]
    return float(spectrum[np.hypot(yy - h / 2, xx - w / 2) > min(h, w) / 4].sum())


def test_rounding_is_half_up_never_truncation():
    x = np.array([0.0, 0.4 / 255, 0.6 / 255, 1.5 / 255, 254.6 / 255, 1.2, -0.3], dtype=np.float32)
    assert to_uint8(x).tolist() == [0, 0, 1, 2, 255, 255, 0]


def test_jpeg_cushion_matches_a_direct_pillow_round_trip(xray_images):
    for image in xray_images:
        buffer = io.BytesIO()
        Image.fromarray(image[:, :, 0], mode="L").save(buffer, format="JPEG", quality=80)
        reference = np.asarray(Image.open(buffer))[:, :, None]
        np.testing.assert_array_equal(JpegCushion(quality=80)(image), reference)


def test_jpeg_cushion_rgb_uses_pinned_420_subsampling():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=80, subsampling="4:2:0")
    np.testing.assert_array_equal(JpegCushion()(image), np.asarray(Image.open(buffer)))


def test_jpeg_cushion_bytes_are_pinned(xray_images):
    """Golden hash: a Pillow / libjpeg-turbo change that alters the Cushion must be noticed (train/serve drift)."""
    out = JpegCushion(quality=80)(xray_images[0])
    assert hashlib.sha256(out.tobytes()).hexdigest() == GOLDEN_JPEG80


@pytest.mark.parametrize("cushion", [JpegCushion(quality=80), JpegCushion(quality=50), TVCushion(weight=0.1)])
def test_cushion_removes_high_frequency_energy(xray_images, cushion):
    rng = np.random.default_rng(1)
    noisy = np.clip(xray_images[1].astype(np.int16) + rng.integers(-12, 13, xray_images[1].shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    assert _high_frequency_energy(cushion(noisy)) < 0.95 * _high_frequency_energy(noisy)  # identity gives 1.0


def test_bit_depth_matches_formula():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    out = BitDepthCushion(bits=4)(image)
    expected = np.floor(np.round(image / 255 * 15) / 15 * 255 + 0.5)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert len(np.unique(out)) == 16


def test_tv_cushion_lowers_total_variation(xray_images):
    image = xray_images[2].astype(np.float64)
    out = TVCushion(weight=0.05)(xray_images[2]).astype(np.float64)
    tv = lambda a: np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()  # noqa: E731
    assert tv(out) < 0.9 * tv(image)


def test_apply_batch_equals_per_image_calls(xray_images):
    cushion = JpegCushion()
    batch = np.stack(xray_images[:3]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    out = cushion.apply_batch(batch)
    for i in range(3):
        np.testing.assert_array_equal(to_uint8(out[i]).transpose(1, 2, 0), cushion(xray_images[i]))


def test_no_cushion_is_identity(xray_images):
    np.testing.assert_array_equal(NoCushion()(xray_images[0]), xray_images[0])


def test_parse_cushion_strings_and_dicts():
    assert parse_cushion("jpeg") == JpegCushion(quality=80)
    assert parse_cushion("jpeg:70") == JpegCushion(quality=70)
    assert parse_cushion("bitdepth:4") == BitDepthCushion(bits=4)
    assert parse_cushion({"kind": "tv", "weight": 0.05}) == TVCushion(weight=0.05)
    assert parse_cushion("none") == NoCushion()


@pytest.mark.parametrize("spec", ["jpeg:0", "jpeg:101", "bitdepth:9", "tv:-1", "median", {"kind": "jpeg", "q": 3}])
def test_invalid_cushion_parameters_are_refused(spec):
    with pytest.raises(ValidationError):
        parse_cushion(spec)


def test_cushion_refuses_float_or_misshaped_input():
    with pytest.raises(TypeError, match="uint8"):
        JpegCushion()(np.zeros((8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x C"):
        JpegCushion()(np.zeros((8, 8), dtype=np.uint8))


def test_serving_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "import models, models.cushion, models.bundle, models.imaging\n"
            "import numpy as np; from models.cushion import JpegCushion\n"
            "print(JpegCushion()(np.zeros((16, 16, 1), np.uint8)).shape)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(16, 16, 1)" in result.stdout


# sha256 of JpegCushion(quality=80) on test/NORMAL/IM-0001-0001.png with Pillow 13.0.0 (libjpeg-turbo 3.x)
GOLDEN_JPEG80 = "ff100d66a7eef95adc501aaaf1e6a03b6813c140fb059a442330c96221da7457"


def test_randomised_jpeg_draws_quality_and_grid_offset_per_image_reproducibly(xray_images):
    image = xray_images[0]
    fixed = RandomisedJpegCushion(quality_spread=0, max_shift=0, seed=0)
    assert np.array_equal(fixed(image), JpegCushion()(image))  # no randomness left: the fixed Cushion, byte for byte
    a, b = RandomisedJpegCushion(seed=7), RandomisedJpegCushion(seed=7)
    draws_a, draws_b = [a(image) for _ in range(8)], [b(image) for _ in range(8)]
    assert all(np.array_equal(p, q) for p, q in zip(draws_a, draws_b))  # the seed replays the draws
    assert len({d.tobytes() for d in draws_a}) > 1  # and they differ between calls
    # Every draw is some Pillow JPEG of the image at a quality in range with a grid offset of at most 2 px.
    candidates = {jpeg_round_trip(image, q, (dy, dx)).tobytes()
                  for q in range(70, 91) for dy in range(3) for dx in range(3)}
    assert all(d.tobytes() in candidates for d in draws_a)


def test_a_grid_offset_moves_the_blocks_not_the_content(xray_images):
    image = xray_images[0]
    shifted = jpeg_round_trip(image, 80, (2, 1)).astype(int)
    assert shifted.shape == image.shape
    assert np.abs(shifted - image).mean() < np.abs(shifted - np.roll(image, (2, 1), axis=(0, 1))).mean()
    assert not np.array_equal(shifted, JpegCushion()(image))
