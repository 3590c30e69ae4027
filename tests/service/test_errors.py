"""Bad input gets a 4xx with a clear JSON reason, never a 5xx, and the service keeps serving."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.service.conftest import encode, png_bytes, serve
from tests.service.dicom_factory import make_dicom, make_document


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims `width` x `height`, followed by a tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(np.zeros((8, 8), np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _error(response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason and body["detail"] and body["request_id"]
    return body


def test_text_and_unknown_bytes_are_415(service, image_paths):
    _error(service.post_image(b"hello, world", content_type="text/plain"), 415, "unsupported_media_type")
    body = _error(service.post_image(b"GIF89a" + bytes(100), content_type="application/octet-stream"), 415,
                  "unsupported_media_type")
    assert "PNG, JPEG or DICOM" in body["detail"]
    # the declared type contradicts the bytes
    body = _error(service.post_image(png_bytes(image_paths[0]), content_type="image/jpeg"), 415,
                  "unsupported_media_type")
    assert "jpeg" in body["detail"] and "png" in body["detail"]


def test_truncated_png_is_422(service, image_paths):
    data = png_bytes(image_paths[0])
    body = _error(service.post_image(data[: len(data) // 2]), 422, "undecodable")
    assert "PNG" in body["detail"]


def test_empty_body_and_missing_multipart_field_are_422(service):
    _error(service.post_image(b""), 422, "empty_body")
    _error(service.request("POST", "/v1/diagnose", files={"image": ("x.png", b"123", "image/png")}), 422,
           "missing_file")


def test_decompression_bomb_headers_are_413_before_decoding(service):
    _error(service.post_image(_png_with_size(60000, 60000)), 413, "too_many_pixels")
    _error(service.post_image(_jpeg_with_size(65000, 65000), content_type="image/jpeg"), 413, "too_many_pixels")


def test_dicom_refusals_are_clear(service, image_paths):
    from pydicom.uid import JPEGLSLossless

    png = np.asarray(Image.open(image_paths[0]))
    body = _error(service.post_image(make_dicom(np.stack([png, png]), frames=2), "application/dicom"), 422,
                  "unsupported_image")
    assert "multi-frame" in body["detail"]
    body = _error(service.post_image(make_dicom(None), "application/dicom"), 422, "undecodable")
    assert "no pixel data" in body["detail"]
    body = _error(service.post_image(make_dicom(None, transfer_syntax=JPEGLSLossless, encapsulated=b"\xff\xd8" * 20,
                                                rows_cols=(64, 64)), "application/dicom"), 415,
                  "unsupported_media_type")
    assert "JPEG-LS" in body["detail"] and "pylibjpeg" in body["detail"]
    for kind, name in (("pdf", "Encapsulated PDF Storage"), ("sr", "Basic Text SR Storage")):
        body = _error(service.post_image(make_document(kind), "application/dicom"), 422, "not_an_image")
        assert body["detail"].startswith(f"{name} is not an image")


def test_oversize_body_is_413_by_header_and_while_streaming(bundle_dir, image_paths):
    data = png_bytes(image_paths[0])
    assert len(data) > 4096
    with serve(bundle_dir, max_upload_bytes=4096) as small:
        _error(small.post_image(data), 413, "payload_too_large")

        async def chunks():
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        streamed = small.request("POST", "/v1/diagnose", content=chunks(), headers={"content-type": "image/png"})
        assert "content-length" not in streamed.request.headers
        _error(streamed, 413, "payload_too_large")
        _error(small.request("POST", "/v1/diagnose", files={"file": ("x.png", data, "image/png")}), 413,
               "payload_too_large")
        assert small.sample("aegis_request_errors_total", {"reason": "payload_too_large"}) == 3
        assert small.post_image(encode(np.zeros((16, 16), np.uint8))).status_code == 200  # still serving


def test_pixel_limit_is_413(bundle_dir, image_paths):
    with serve(bundle_dir, max_pixels=128 * 128 - 1) as small:
        _error(small.post_image(png_bytes(image_paths[0])), 413, "too_many_pixels")
        assert small.post_image(encode(np.zeros((64, 64), np.uint8))).status_code == 200


def _malformed_bodies(sample_png: bytes) -> list[tuple[str, bytes, str]]:
    rng = np.random.default_rng(0)
    gray = np.asarray(Image.open(io.BytesIO(sample_png)))
    cmyk = io.BytesIO()
    Image.fromarray(np.stack([gray] * 3, -1)).convert("CMYK").save(cmyk, format="JPEG")
    dicom = make_dicom(gray)
    bodies = [
        ("empty", b"", "image/png"),
        ("empty octet", b"", "application/octet-stream"),
        ("png magic only", sample_png[:8], "image/png"),
        ("huge dimensions png", _png_with_size(2**31 - 1, 2**31 - 1), "image/png"),
        ("zero dimensions png", _png_with_size(0, 0), "image/png"),
        ("huge dimensions jpeg", _jpeg_with_size(65535, 65535), "image/jpeg"),
        ("16-bit png", encode((gray.astype(np.uint16) * 257)), "image/png"),
        ("cmyk jpeg", cmyk.getvalue(), "image/jpeg"),
        ("rgba png", encode(np.dstack([gray] * 3 + [np.full_like(gray, 128)])), "image/png"),
        ("palette png", (lambda b: (Image.fromarray(gray).convert("P").save(b, format="PNG"), b.getvalue())[1])(
            io.BytesIO()), "image/png"),
        ("1x1 png", encode(np.zeros((1, 1), np.uint8)), "image/png"),
        ("dicom without pixels", make_dicom(None), "application/dicom"),
        ("dicom absurd size no pixels", make_dicom(None, rows_cols=(60000, 60000)), "application/dicom"),
        ("dicom truncated", dicom[: len(dicom) - 5000], "application/dicom"),
        ("dicom header only", dicom[:132], "application/dicom"),
        ("dicom magic then garbage", bytes(128) + b"DICM" + rng.bytes(300), "application/dicom"),
        ("json", b'{"image": "x"}', "application/json"),
        ("form", b"a=b", "application/x-www-form-urlencoded"),
        ("wrong declared type", sample_png, "application/dicom"),
        ("weird content type", sample_png, "image/x-nonsense"),
        ("gif", b"GIF89a\x01\x00\x01\x00" + bytes(20), "image/gif"),
        ("bmp", encode(gray, "BMP"), "image/bmp"),
        ("tiff", encode(gray, "TIFF"), "application/octet-stream"),
        ("jpeg truncated", encode(gray, "JPEG")[:300], "image/jpeg"),
        ("multipart broken", b"--xx\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
         "multipart/form-data; boundary=xx"),
        ("multipart no boundary", b"abc", "multipart/form-data"),
    ]
    corrupt = bytearray(sample_png)
    corrupt[40:60] = rng.bytes(20)
    bodies.append(("png corrupted idat", bytes(corrupt), "image/png"))
    for cut in (16, 33, 60, 200, len(sample_png) - 12):
        bodies.append((f"png truncated at {cut}", sample_png[:cut], "image/png"))
    for i, size in enumerate([1, 4, 7, 16, 132, 1000, 5000, 20000]):
        bodies.append((f"random {size}", rng.bytes(size), "application/octet-stream"))
        bodies.append((f"png magic + random {size}", b"\x89PNG\r\n\x1a\n" + rng.bytes(size), "image/png"))
        bodies.append((f"jpeg magic + random {size}", b"\xff\xd8\xff" + rng.bytes(size), "image/jpeg"))
    return bodies


def test_fuzz_malformed_bodies_never_get_a_5xx_and_the_service_keeps_serving(service, image_paths):
    sample = png_bytes(image_paths[0])
    statuses = {}
    for name, data, content_type in _malformed_bodies(sample):
        for url in ("/v1/diagnose", "/diagnose"):
            response = service.post_image(data, content_type=content_type, url=url)
            assert response.status_code < 500, (name, response.status_code, response.text)
            if response.status_code >= 400:
                body = response.json()
                assert body["reason"] and body["detail"], (name, body)
            statuses[name] = response.status_code
    # the valid oddities are served, the invalid ones refused
    assert statuses["16-bit png"] == statuses["cmyk jpeg"] == statuses["rgba png"] == statuses["palette png"] == 200
    assert statuses["huge dimensions png"] == statuses["huge dimensions jpeg"] == 413
    assert statuses["dicom without pixels"] == 422 and statuses["empty"] == 422
    assert all(statuses[f"random {n}"] in (415, 422) for n in (1, 4, 7, 16, 132, 1000, 5000, 20000))
    assert service.sample("aegis_request_errors_total", {"reason": "internal"}) == 0
    # and it still answers correctly
    assert service.post_image(sample).status_code == 200
    assert service.get("/readyz").status_code == 200


def test_sixteen_bit_png_is_scaled_linearly(service, reference, image_paths):
    gray = np.asarray(Image.open(image_paths[0]))
    sixteen = service.post_image(encode(gray.astype(np.uint16) * 257)).json()  # 257 * v maps back to v exactly
    eight = service.post_image(png_bytes(image_paths[0])).json()
    assert (sixteen["diagnosis"], sixteen["shield_logit"]) == (eight["diagnosis"], eight["shield_logit"])


def test_unknown_route_and_method_are_json_4xx(service):
    assert service.get("/nope").status_code == 404 and service.get("/nope").json()["reason"] == "http"
    assert service.get("/v1/diagnose").status_code == 405
