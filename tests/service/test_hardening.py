"""What an outside review found (issue 16, item 7), in process: decompression bombs under the pixel cap, deadlines
and bounded stages, bundle integrity, the reconnaissance surface and failed logins, the Shield logit as an oracle,
and the minor findings. The HTTP-level limits are tested against a real server in test_http_limits.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from models.bundle import BundleError, load_bundle, write_manifest
from service import decode
from service.config import Settings
from service.decode import decode_image
from service.errors import UnsupportedImage
from tests.service.conftest import REPO, copy_bundle, encode, png_bytes, serve
from tests.service.dicom_factory import make_dicom

KEY = "hardening-test-key-1"
RNG = np.random.default_rng(16)


def _traced_peak(fn, *args):
    """Peak bytes Python and numpy allocate while `fn` runs (tracemalloc sees numpy's buffers)."""
    tracemalloc.start()
    try:
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- bombs under the pixel cap ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """The review's bomb: a 7000 x 7000 16-bit PNG (~95 KB on the wire, 98 MB decoded)."""
    return encode(np.zeros((7000, 7000), np.uint16))


def test_the_16_bit_png_bomb_is_refused_with_413_at_once(service, bomb_png):
    assert len(bomb_png) < 200_000
    started = time.monotonic()
    response = service.post_image(bomb_png)
    assert time.monotonic() - started < 1.0
    assert response.status_code == 413 and response.json()["reason"] == "too_many_pixels", response.text
    assert "7000 x 7000" in response.json()["detail"]


def test_16_bit_to_8_bit_is_exact_integer_arithmetic_in_bounded_memory():
    values = RNG.integers(0, 65536, size=(3000, 3000), dtype=np.uint16)
    image = Image.fromarray(values)
    out, peak = _traced_peak(decode._to_8bit, image, "PNG")
    reference = np.floor(values.astype(np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(out), reference)
    # the 8-bit result (9 MB) and a few row strips: no float64 copies of the whole image (72 MB each)
    assert peak < values.size * 1.5 + 8_000_000, peak


def test_dicom_grayscale_conversion_runs_in_bounded_memory():
    stored = RNG.integers(0, 4096, size=(2000, 2000), dtype=np.uint16)
    data = make_dicom(stored, bits_stored=12, slope=0.5, intercept=-100.0, window=(600.0, 1400.0))
    decoded, peak = _traced_peak(decode_image, data)
    assert decoded.image.size == (2000, 2000)
    # the parsed file (8 MB of pixel bytes), the stored array (8 MB), the 8-bit result (4 MB) and row strips;
    # float64 copies of the whole frame are 32 MB each
    assert peak < stored.size * 6 + 8_000_000, peak


# --- deadlines and bounded stages ---------------------------------------------------------------------------------------

def test_the_request_deadline_counts_from_the_first_byte_of_a_slow_upload(bundle_dir, image_paths):
    data = png_bytes(image_paths[0])
    step = len(data) // 6 + 1

    async def slow_body():  # the whole body takes 3 s to arrive
        for start in range(0, len(data), step):
            yield data[start:start + step]
            await asyncio.sleep(0.5)

    with serve(bundle_dir, request_timeout_seconds=1.0) as harness:
        started = time.monotonic()
        response = harness.request("POST", "/v1/diagnose", content=slow_body(), headers={"content-type": "image/png"})
        elapsed = time.monotonic() - started
        assert response.status_code == 503 and response.json()["reason"] == "timeout", response.text
        assert response.headers["retry-after"] == "1"
        assert elapsed < 2.0, elapsed
        assert harness.post_image(data).status_code == 200  # still serving


def test_the_decode_stage_is_bounded_counted_and_answers_503_with_retry_after(bundle_dir, image_paths, monkeypatch):
    import service.diagnosis as diagnosis

    real_decode, seen = diagnosis.decode_image, []
    holder = {}

    def slow_decode(*args, **kwargs):
        seen.append(holder["harness"].sample("aegis_stage_inflight", {"stage": "decode"}))
        time.sleep(0.5)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(diagnosis, "decode_image", slow_decode)
    data = png_bytes(image_paths[0])
    with serve(bundle_dir, preprocess_threads=1, max_inflight_decodes=2) as harness:
        holder["harness"] = harness
        started = time.monotonic()
        responses = harness.gather([dict(method="POST", url="/v1/diagnose", content=data,
                                         headers={"content-type": "image/png"})] * 6)
        assert time.monotonic() - started < 2.5
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 2 and codes.count(503) == 4, codes
        for r in responses:
            if r.status_code == 503:
                assert r.json()["reason"] == "overloaded" and r.headers["retry-after"] == "1"
        assert max(seen) >= 1
        for stage in ("upload", "decode", "queue", "inference"):
            assert harness.sample("aegis_stage_inflight", {"stage": stage}) == 0, stage


# --- bundle integrity -------------------------------------------------------------------------------------------------

def canonical_digest(bundle_dir) -> str:
    """Written from the documented definition, independently of models.bundle: sha256 of the canonical manifest."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_the_bundle_digest_is_served_and_changes_with_any_threshold(service, bundle_dir, accept_all_bundle):
    body = service.get("/v1/model").json()
    assert body["bundle_digest"] == canonical_digest(bundle_dir) and body["bundle_signature"] == "unsigned"
    info = [line for line in service.get("/metrics").text.splitlines() if line.startswith("aegis_model_info{")]
    assert f'bundle_digest="{canonical_digest(bundle_dir)}"' in info[0]
    assert load_bundle(accept_all_bundle).digest == canonical_digest(accept_all_bundle) != canonical_digest(bundle_dir)


def _sign(*argv: str) -> None:
    from models import signing

    assert signing.main(list(argv)) == 0


def test_a_signed_bundle_starts_and_an_edited_or_unsigned_one_refuses(bundle_dir, tmp_path):
    keys, signed = tmp_path / "keys", copy_bundle(bundle_dir, tmp_path / "bundle")
    _sign("keygen", "--out", str(keys))
    private, public = keys / "bundle-signing.key", keys / "bundle-signing.pub"
    _sign("sign", "--bundle", str(signed), "--key", str(private))
    assert load_bundle(signed, public_key_file=public).signature == "verified"
    with serve(signed, bundle_public_key_file=public) as harness:
        assert harness.get("/v1/model").json()["bundle_signature"] == "verified"

    manifest = load_bundle(signed).manifest  # thresholds edited, hashes recomputed: a consistent manifest
    write_manifest(signed, manifest.model_copy(update={"thresholds": {c: -1e9 for c in manifest.classes}}))
    with pytest.raises(BundleError, match="signature"):
        load_bundle(signed, public_key_file=public)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}
    env.update(AEGIS_AUTH_DISABLED="true", AEGIS_BUNDLE_PUBLIC_KEY_FILE=str(public))
    run = subprocess.run([sys.executable, "-m", "service", "--bundle", str(signed)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "signature" in run.stderr, run.stderr

    (signed / "bundle.sig").unlink()
    with pytest.raises(BundleError, match="no signature"):
        load_bundle(signed, public_key_file=public)


# --- reconnaissance and failed logins ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(bundle_dir):
    with serve(bundle_dir, auth_disabled=False, api_keys=KEY) as harness:
        yield harness


def test_metrics_docs_and_model_metadata_need_a_key_by_default(keyed):
    for path in ("/metrics", "/docs", "/openapi.json", "/v2", "/v2/models/aegis-tiny"):
        assert keyed.get(path).status_code == 401, path
        assert keyed.get(path, headers={"x-api-key": KEY}).status_code == 200, path
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert keyed.get(path).status_code == 200, path


def test_the_open_surface_is_a_setting(bundle_dir):
    with serve(bundle_dir, auth_disabled=False, api_keys=KEY, metrics_access="open", docs_access="off") as harness:
        assert harness.get("/metrics").status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert harness.get(path, headers={"x-api-key": KEY}).status_code == 404, path


def test_failed_logins_are_throttled_with_429_and_retry_after(bundle_dir, image_paths):
    data = png_bytes(image_paths[0])
    with serve(bundle_dir, auth_disabled=False, api_keys=KEY, auth_failure_limit=3,
               auth_failure_window_seconds=60) as harness:
        for _ in range(3):
            assert harness.post_image(data, headers={"x-api-key": "wrong-key-guess"}).status_code == 401
        throttled = harness.post_image(data, headers={"x-api-key": "wrong-key-guess"})
        assert throttled.status_code == 429 and throttled.json()["reason"] == "auth_throttled"
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        # while throttled even the right key gets no answer: guessing must not pay off
        assert harness.post_image(data, headers={"x-api-key": KEY}).status_code == 429
        assert harness.sample("aegis_request_errors_total", {"reason": "auth_throttled"}) == 2


def test_keys_are_validated_at_start_up(tmp_path):
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(_env_file=None, api_keys="a")
    with pytest.raises(ValidationError, match="ASCII"):
        Settings(_env_file=None, api_keys="clé-non-ascii-0123456789")
    bom = tmp_path / "keys"
    bom.write_bytes("\ufeffkey-after-a-bom-0123\n".encode())
    assert Settings(_env_file=None, api_keys_file=bom).all_api_keys() == (b"key-after-a-bom-0123",)
    with pytest.raises(ValidationError, match="AEGIS_AUTH_DISABLED"):
        Settings(_env_file=None, auth_disabled=True, api_keys=KEY)


# --- the Shield logit as an oracle ------------------------------------------------------------------------------------

def test_exact_scores_only_for_keys_with_the_full_scope(bundle_dir, image_paths, tmp_path, reference):
    keys = tmp_path / "keys"
    keys.write_text("# key scope\ntrusted-caller-key-01 full\nother-caller-key-0002 coarse\nplain-caller-key-0003\n",
                    encoding="utf-8")
    path = image_paths[0]
    expected = reference.answer(Image.open(path))
    with serve(bundle_dir, auth_disabled=False, api_keys_file=keys, default_scope="coarse") as harness:
        full = harness.post_image(png_bytes(path), headers={"x-api-key": "trusted-caller-key-01"}).json()
        assert full["shield_logit"] == pytest.approx(expected["shield_logit"], abs=1e-6)
        assert full["threshold"] == pytest.approx(expected["threshold"]) and "probabilities" in full
        for key in ("other-caller-key-0002", "plain-caller-key-0003"):
            coarse = harness.post_image(png_bytes(path), headers={"x-api-key": key}).json()
            assert set(coarse) == {"request_id", "diagnosis", "decision", "model", "input"}, coarse
            assert (coarse["diagnosis"], coarse["decision"]) == (expected["diagnosis"], expected["decision"])
            for url in ("/v1/model", "/v1/decisions", "/metrics"):  # where the scores and thresholds are
                assert harness.get(url, headers={"x-api-key": key}).status_code == 403, url
                assert harness.get(url, headers={"x-api-key": "trusted-caller-key-01"}).status_code == 200, url


def test_the_default_scope_applies_without_authentication(bundle_dir, image_paths, service):
    assert "shield_logit" in service.post_image(png_bytes(image_paths[0])).json()  # backward compatible default
    with serve(bundle_dir, default_scope="coarse") as harness:
        assert "shield_logit" not in harness.post_image(png_bytes(image_paths[0])).json()


# --- minor -----------------------------------------------------------------------------------------------------------

def test_a_422_never_quotes_the_photometric_interpretation():
    with pytest.raises(UnsupportedImage) as info:
        decode_image(make_dicom(np.zeros((8, 8), np.uint8), photometric="PATIENTSMITH"))
    assert "PATIENTSMITH" not in info.value.message and "photometric" in info.value.message.lower()
    with pytest.raises(UnsupportedImage, match="HSV"):  # a standard defined term is not patient data
        decode_image(make_dicom(np.zeros((8, 8), np.uint8), photometric="HSV"))


def test_diagnosis_answers_are_not_cached(service, image_paths):
    response = service.post_image(png_bytes(image_paths[0]))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
