"""POST /diagnose answers exactly what the offline pipeline (models + onnxruntime, and torch) answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import encode, png_bytes
from tests.service.dicom_factory import PATIENT, make_dicom


def _check_same(body: dict, expected: dict) -> None:
    assert body["diagnosis"] == expected["diagnosis"]
    assert body["decision"] == expected["decision"]
    assert body["shield_logit"] == pytest.approx(expected["shield_logit"], abs=1e-6)
    assert body["threshold"] == expected["threshold"]


def test_real_xrays_match_the_offline_pipeline_exactly(service, reference, image_paths):
    seen = set()
    for path in image_paths:
        expected = reference.answer(Image.open(path))
        response = service.post_image(png_bytes(path))
        assert response.status_code == 200, response.text
        body = response.json()
        _check_same(body, expected)
        assert body["shield_logit"] == float(expected["shield_logit"])  # sequential requests: bit-identical
        probs = np.exp(expected["logits"] - expected["logits"].max())
        probs /= probs.sum()
        assert list(body["probabilities"]) == list(reference.manifest.classes)
        np.testing.assert_allclose(list(body["probabilities"].values()), probs, rtol=1e-6)
        assert body["model"] == {"name": reference.manifest.name, "version": reference.manifest.version}
        assert body["input"] == {"format": "png", "width": 128, "height": 128}
        assert set(body["timings_seconds"]) == {"decode", "prepare", "cushion", "queue", "inference", "total"}
        assert body["timings_seconds"]["total"] >= body["timings_seconds"]["inference"] > 0
        seen.add(body["diagnosis"])
    assert len(seen) >= 1


def test_service_answers_match_the_torch_model(service, reference, image_paths):
    torch = pytest.importorskip("torch")
    from models.networks import load_aegis

    net = load_aegis(reference.bundle)
    for path in image_paths[:6]:
        expected = reference.answer(Image.open(path))
        with torch.no_grad():
            logits, shield = (t.numpy()[0] for t in net(torch.from_numpy(expected["x"])))
        body = service.post_image(png_bytes(path)).json()
        k = int(np.argmax(logits))
        assert body["diagnosis"] == reference.manifest.classes[k]
        assert body["shield_logit"] == pytest.approx(float(shield[k]), abs=1e-4)
        np.testing.assert_allclose(list(body["probabilities"].values()),
                                   np.exp(logits) / np.exp(logits).sum(), atol=1e-4)


def test_multipart_upload_and_raw_body_give_the_same_answer(service, image_paths):
    data = png_bytes(image_paths[0])
    raw = service.post_image(data, url="/diagnose").json()
    multipart = service.request("POST", "/v1/diagnose", files={"file": ("x.png", data, "image/png")}).json()
    octet = service.post_image(data, content_type="application/octet-stream").json()
    for other in (multipart, octet):
        assert {k: other[k] for k in ("diagnosis", "decision", "shield_logit")} == \
               {k: raw[k] for k in ("diagnosis", "decision", "shield_logit")}
    assert raw["request_id"] != multipart["request_id"]


def test_request_id_is_echoed(service, image_paths):
    response = service.post_image(png_bytes(image_paths[0]), headers={"x-request-id": "abc-123"})
    assert response.json()["request_id"] == "abc-123" == response.headers["x-request-id"]


def test_jpeg_upload_matches_offline_decode_of_the_same_jpeg(service, reference, image_paths):
    array = np.asarray(Image.open(image_paths[1]).convert("L"))
    data = encode(array, "JPEG", quality=92)
    import io

    expected = reference.answer(Image.open(io.BytesIO(data)))
    body = service.post_image(data, content_type="image/jpeg").json()
    _check_same(body, expected)
    assert body["input"]["format"] == "jpeg"


def test_rgb_png_is_converted_like_the_offline_pipeline(service, reference, image_paths):
    import io

    rgb = np.asarray(Image.open(image_paths[2]).convert("RGB"))
    data = encode(rgb)
    _check_same(service.post_image(data).json(), reference.answer(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("variant", ["8bit", "16bit_rescale_window", "monochrome1"])
def test_dicom_made_from_a_png_gives_the_png_answer(service, image_paths, variant):
    for path in image_paths[:3]:
        png = np.asarray(Image.open(path))
        assert png.dtype == np.uint8 and png.ndim == 2
        if variant == "8bit":
            dicom = make_dicom(png)
        elif variant == "16bit_rescale_window":
            # stored = 16 * png + 7 (12 bits); rescale back to png; a window that maps 0..255 onto itself
            dicom = make_dicom(png.astype(np.uint16) * 16 + 7, bits_stored=12, slope=1 / 16, intercept=-7 / 16,
                               window=(128, 256))
        else:
            dicom = make_dicom(255 - png, photometric="MONOCHROME1")
        from_png = service.post_image(png_bytes(path)).json()
        from_dicom = service.post_image(dicom, content_type="application/dicom")
        assert from_dicom.status_code == 200, from_dicom.text
        body = from_dicom.json()
        assert body["input"]["format"] == "dicom"
        assert (body["diagnosis"], body["decision"], body["shield_logit"]) == \
               (from_png["diagnosis"], from_png["decision"], from_png["shield_logit"])


def test_jpeg_baseline_dicom_is_decoded_like_the_jpeg_itself(service, image_paths):
    from pydicom.uid import JPEGBaseline8Bit

    png = np.asarray(Image.open(image_paths[3]))
    jpeg = encode(png, "JPEG", quality=95)
    dicom = make_dicom(None, transfer_syntax=JPEGBaseline8Bit, encapsulated=jpeg, rows_cols=png.shape)
    from_jpeg = service.post_image(jpeg, content_type="image/jpeg").json()
    response = service.post_image(dicom, content_type="application/dicom")
    assert response.status_code == 200, response.text
    assert response.json()["diagnosis"] == from_jpeg["diagnosis"]
    assert response.json()["shield_logit"] == pytest.approx(from_jpeg["shield_logit"], abs=0.05)


def test_logs_never_contain_dicom_patient_data_or_image_bytes(service, image_paths):
    from structlog.testing import capture_logs

    png = np.asarray(Image.open(image_paths[0]))
    dicom = make_dicom(png)
    with capture_logs() as logs:
        ok = service.post_image(dicom, content_type="application/dicom")
        bad = service.post_image(dicom[:600], content_type="application/dicom")  # truncated: an error path
    assert ok.status_code == 200 and 400 <= bad.status_code < 500
    text = repr(logs)
    for value in PATIENT.values():
        assert value not in text and value.replace("^", " ") not in text
    assert "DICM" not in text and "PixelData" not in text
    request_lines = [entry for entry in logs if entry["event"] == "request"]
    assert request_lines and request_lines[0]["format"] == "dicom"
    assert all(len(repr(entry)) < 2000 for entry in logs)  # no body dumped into a log line
