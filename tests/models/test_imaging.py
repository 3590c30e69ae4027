import numpy as np
import pytest
from PIL import Image

from models.imaging import InputSpec, prepare_image


def test_stretch_resizes_to_the_spec_and_converts_channels():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    out = prepare_image(image, InputSpec(channels=1, height=64, width=48))
    assert out.shape == (64, 48, 1) and out.dtype == np.uint8


def test_center_crop_keeps_the_centre():
    array = np.zeros((100, 200), dtype=np.uint8)
    array[:, 50:150] = 255  # the centre square is white, the sides black
    out = prepare_image(Image.fromarray(array), InputSpec(channels=1, height=50, width=50, resize="center_crop"))
    assert out.shape == (50, 50, 1) and out[:, 3:-3].min() >= 250  # Lanczos rings at the very edge


def test_same_size_grayscale_is_untouched(xray_images):
    out = prepare_image(xray_images[0], InputSpec(channels=1, height=128, width=128))
    np.testing.assert_array_equal(out, xray_images[0])


def test_grayscale_to_rgb_replicates():
    out = prepare_image(np.full((8, 8), 77, dtype=np.uint8), InputSpec(channels=3, height=8, width=8))
    assert out.shape == (8, 8, 3) and (out == 77).all()


def test_non_uint8_arrays_are_refused():
    with pytest.raises(TypeError):
        prepare_image(np.zeros((8, 8), dtype=np.uint16), InputSpec(channels=1, height=8, width=8))


def test_exif_orientation_is_applied_so_the_model_sees_the_upright_image(tmp_path):
    import io

    upright = np.arange(24 * 40, dtype=np.uint8).reshape(24, 40)  # wider than tall
    stored = np.rot90(upright)  # the camera stored the pixels sideways: 40 x 24 ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and the rotation in EXIF (orientation 6: turn 90° clockwise to display)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buffer, format="PNG", exif=exif)
    spec = InputSpec(channels=1, height=24, width=40)
    prepared = prepare_image(Image.open(io.BytesIO(buffer.getvalue())), spec)
    np.testing.assert_array_equal(prepared[:, :, 0], upright)
