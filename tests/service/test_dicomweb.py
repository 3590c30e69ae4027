"""DICOMweb STOW-RS (POST /v1/studies): a real client of the field (dicomweb-client, over HTTP to a live uvicorn
server) gets one answer per SOP instance, equal to /v1/diagnose's on the same pixels, and each decision is recorded;
bad instances are refused with a reason, never a 500; no patient data in the logs or the record."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from sqlalchemy import create_engine, text

from service.api.routes_dicomweb import PRIVATE, PRIVATE_CREATOR, PRIVATE_GROUP
from tests.service.conftest import SAMPLES, png_bytes, serve
from tests.service.dicom_factory import PATIENT, make_dicom, make_document, undecodable_transfer_syntax

KEY = "stow-test-key-00007"
BOUNDARY = "aegis-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def private(item) -> dict:
    """The service's answer in an item's private block, by name."""
    block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    return {name: block[offset].value for name, (offset, _) in PRIVATE.items() if offset in block}


def pngs(image_paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L")) for p in [*SAMPLES, *image_paths[:2]]]


class LiveServer:
    """uvicorn serving the harness's app on a loopback port, on the harness's event loop (lifespan already run)."""

    def __init__(self, harness):
        import uvicorn

        self.harness = harness
        self.server = uvicorn.Server(uvicorn.Config(harness.app, host="127.0.0.1", port=0, lifespan="off",
                                                    log_config=None, access_log=False))

    def __enter__(self) -> str:
        self.task = asyncio.run_coroutine_threadsafe(self.server.serve(), self.harness.loop)
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and not self.task.done(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.task.result(20)


@pytest.fixture(scope="module")
def live(bundle_dir):
    with serve(bundle_dir, auth_disabled=False, api_keys=KEY) as harness:
        with LiveServer(harness) as url:
            yield harness, url


def client(url: str, key: str = KEY):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=f"{url}/v1", headers={"X-API-Key": key})


def test_dicomweb_client_stores_instances_and_gets_the_diagnose_answers(live, image_paths, tmp_path):
    harness, url = live
    images = pngs(image_paths)
    datasets = [pydicom.dcmread(io.BytesIO(make_dicom(png))) for png in images]
    answer = client(url).store_instances(datasets)

    items = answer.ReferencedSOPSequence
    assert "FailedSOPSequence" not in answer
    assert [i.ReferencedSOPInstanceUID for i in items] == [d.SOPInstanceUID for d in datasets]
    assert {i.ReferencedSOPClassUID for i in items} == {datasets[0].SOPClassUID}
    manifest = harness.state.bundle.manifest
    for number, (item, png) in enumerate(zip(items, images), start=1):
        buffer = io.BytesIO()
        Image.fromarray(png).save(buffer, format="PNG")
        reference = harness.post_image(buffer.getvalue(), headers={"x-api-key": KEY}).json()
        got = private(item)
        assert got["part"] == number
        assert (got["diagnosis"], got["decision"]) == (reference["diagnosis"], reference["decision"])
        assert got["shield_logit"] == pytest.approx(reference["shield_logit"], abs=1e-5)
        assert got["threshold"] == reference["threshold"]
        assert json.loads(got["probabilities"]) == pytest.approx(reference["probabilities"], abs=1e-6)
        assert (got["model_name"], got["model_version"]) == (manifest.name, manifest.version)

    # the decision record: one row per instance, with the instance's bytes as the client encoded them
    harness.state.recorder.flush()
    listed = harness.get("/v1/decisions", params={"limit": 1000}, headers={"x-api-key": KEY}).json()["decisions"]
    rows = [row for row in listed if row["source"] == "stow-rs"][-len(datasets):]
    assert len({row["request_id"] for row in rows}) == 1  # the HTTP request's id, shared by its instances
    sent = []
    for ds in datasets:
        with io.BytesIO() as b:
            pydicom.dcmwrite(b, ds)
            sent.append(hashlib.sha256(b.getvalue()).hexdigest())
    assert sorted(row["image_sha256"] for row in rows) == sorted(sent)
    for row in rows:
        item = items[sent.index(row["image_sha256"])]
        assert (row["diagnosis"], row["decision"]) == (private(item)["diagnosis"], private(item)["decision"])
        assert row["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:8]


def test_every_bad_instance_is_refused_with_its_reason_beside_the_good_ones(live, image_paths):
    harness, url = live
    png = np.asarray(Image.open(image_paths[0]).convert("L"))
    compressed = undecodable_transfer_syntax()
    if compressed is None:
        pytest.skip("every compressed transfer syntax has a decoder here")
    parts = {
        "good": make_dicom(png),
        "multi-frame": make_dicom(np.stack([png, png]), frames=2),
        "pdf": make_document("pdf"),
        "sr": make_document("sr"),
        "compressed": make_dicom(None, transfer_syntax=compressed, encapsulated=b"\xff\xd8" * 20,
                                 rows_cols=png.shape),
        "garbage": b"not a dicom file at all",
        "truncated": make_dicom(png)[:700],
    }
    errors_before = harness.sample("aegis_request_errors_total", {"reason": "not_an_image"})
    response = harness.request("POST", "/v1/studies", content=multipart(*parts.values()),
                               headers={"content-type": MULTIPART, "x-api-key": KEY})
    assert response.status_code == 202, response.text  # some stored, some failed (PS3.18 10.5.3)
    assert response.headers["content-type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(response.json())
    assert [private(i)["part"] for i in answer.ReferencedSOPSequence] == [1]
    failed = {list(parts)[private(i)["part"] - 1]: i for i in answer.FailedSOPSequence}
    assert sorted(failed) == sorted(set(parts) - {"good"})
    expected = {  # (Failure Reason, the service's reason code, words of the detail)
        "multi-frame": (0xC000, "unsupported_image", "multi-frame"),
        "pdf": (0x0122, "not_an_image", "Encapsulated PDF Storage"),
        "sr": (0x0122, "not_an_image", "Basic Text SR Storage"),
        "compressed": (0xC122, "unsupported_media_type", "no decoder plugin"),
        "garbage": (0xC000, "unsupported_media_type", "unrecognised image bytes"),
        "truncated": (0xC000, "undecodable", "DICOM"),
    }
    for name, (status, reason, words) in expected.items():
        item = failed[name]
        assert item.FailureReason == status, name
        assert private(item)["reason"] == reason and words in private(item)["detail"], name
    for name in ("multi-frame", "pdf", "sr", "compressed"):  # readable headers: the instance is named
        assert failed[name].ReferencedSOPInstanceUID == pydicom.dcmread(io.BytesIO(parts[name])).SOPInstanceUID
    assert "ReferencedSOPInstanceUID" not in failed["garbage"]
    assert harness.sample("aegis_request_errors_total", {"reason": "not_an_image"}) == errors_before + 2


def test_all_refused_is_409_and_a_non_dicom_part_is_refused(live, image_paths):
    harness, url = live
    headers = {"content-type": MULTIPART, "x-api-key": KEY}
    response = harness.request("POST", "/v1/studies", content=multipart(make_document("pdf")), headers=headers)
    assert response.status_code == 409
    assert pydicom.Dataset.from_json(response.json()).FailedSOPSequence[0].FailureReason == 0x0122
    png = png_bytes(image_paths[0])
    response = harness.request("POST", "/v1/studies", content=multipart(png, part_type="image/png"), headers=headers)
    assert response.status_code == 409
    assert "not application/dicom" in private(pydicom.Dataset.from_json(response.json()).FailedSOPSequence[0])["detail"]
    with pytest.raises(requests.HTTPError) as raised:  # the client sees the refusal as an HTTP error
        client(url).store_instances([pydicom.dcmread(io.BytesIO(make_document("sr")))])
    assert raised.value.response.status_code == 409


@pytest.mark.parametrize("content_type, body, status, reason", [
    ("application/dicom", b"x", 415, "unsupported_media_type"),
    (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', multipart(b"{}"), 415,
     "unsupported_media_type"),
    ('multipart/related; type="application/dicom"', multipart(b"x"), 400, "malformed_multipart"),
    (MULTIPART, f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(), 400, "malformed_multipart"),
    (MULTIPART, f"--{BOUNDARY}--\r\n".encode(), 400, "malformed_multipart"),
    (MULTIPART, b"no boundary anywhere", 400, "malformed_multipart"),
])
def test_unreadable_requests_get_a_clear_4xx(live, content_type, body, status, reason):
    harness, _ = live
    response = harness.request("POST", "/v1/studies", content=body, headers={"content-type": content_type,
                                                                               "x-api-key": KEY})
    assert (response.status_code, response.json()["reason"]) == (status, reason), response.text


def test_the_same_auth_and_size_limits_as_diagnose(live, bundle_dir, image_paths):
    harness, url = live
    dicom = make_dicom(np.asarray(Image.open(image_paths[0]).convert("L")))
    for headers in ({}, {"x-api-key": "wrong"}):
        response = harness.request("POST", "/v1/studies", content=multipart(dicom),
                                   headers={"content-type": MULTIPART, **headers})
        assert (response.status_code, response.json()["reason"]) == (401, "unauthorized")
    with pytest.raises(requests.HTTPError) as raised:
        client(url, key="wrong").store_instances([pydicom.dcmread(io.BytesIO(dicom))])
    assert raised.value.response.status_code == 401

    with serve(bundle_dir, max_upload_bytes=len(dicom) + 1000, dicomweb_max_instances=2) as small:
        assert small.request("POST", "/v1/studies", content=multipart(dicom),
                             headers={"content-type": MULTIPART}).status_code == 200
        too_big = small.request("POST", "/v1/studies", content=multipart(dicom, dicom),
                                headers={"content-type": MULTIPART})
        assert (too_big.status_code, too_big.json()["reason"]) == (413, "payload_too_large")
    with serve(bundle_dir, dicomweb_max_instances=2) as few:
        too_many = few.request("POST", "/v1/studies", content=multipart(dicom, dicom, dicom),
                               headers={"content-type": MULTIPART})
        assert (too_many.status_code, too_many.json()["reason"]) == (413, "payload_too_large")
        assert "AEGIS_DICOMWEB_MAX_INSTANCES" in too_many.json()["detail"]
        assert few.sample("aegis_requests_total", {"route": "/v1/studies", "status": "413"}) == 1


def test_no_patient_data_in_the_logs_or_the_record(bundle_dir, image_paths, tmp_path):
    from structlog.testing import capture_logs

    path = tmp_path / "records.sqlite"
    png = np.asarray(Image.open(image_paths[0]).convert("L"))
    parts = [make_dicom(png), make_dicom(np.stack([png, png]), frames=2), make_document("pdf")]
    uids = [pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID for p in parts]
    assert all(value.encode() in part for value in PATIENT.values() for part in parts)
    with serve(bundle_dir, record_url=f"sqlite:///{path}") as harness:
        with capture_logs() as logs:  # inside: the app configures structlog when it is created
            response = harness.request("POST", "/v1/studies", content=multipart(*parts),
                                       headers={"content-type": MULTIPART})
            assert response.status_code == 202
            harness.state.recorder.flush()
            listed = harness.get("/v1/decisions").json()["decisions"]
    assert [row["source"] for row in listed] == ["stow-rs"]
    instance_lines = [entry for entry in logs if entry["event"] == "dicom_instance"]
    assert sorted(entry["outcome"] for entry in instance_lines) == ["diagnosed", "refused", "refused"]
    with create_engine(f"sqlite:///{path}").connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for value in [*PATIENT.values(), "Doe", "PID-4711", *uids]:
        assert value.encode() not in stored, value
        assert value not in json.dumps(listed)
        assert value not in repr(logs), value
