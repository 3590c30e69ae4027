"""One real `python -m service` process on 127.0.0.1: serving, auth, JSON logs without patient data, SIGTERM drain,
and the decision record flushed at shutdown."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.security import key_id
from tests.service.conftest import png_bytes
from tests.service.dicom_factory import PATIENT, make_dicom
from tests.service.server import running_service

KEY = "uvicorn-test-key"


@pytest.fixture()
def server(bundle_dir, tmp_path):
    env = dict(AEGIS_API_KEYS=KEY, AEGIS_DRAIN_SECONDS="1.0", AEGIS_INTRA_OP_THREADS="1",
               AEGIS_MAX_BATCH_WAIT_SECONDS="0.3", AEGIS_RECORD_URL=f"sqlite:///{tmp_path}/records.sqlite",
               AEGIS_RECORD_FLUSH_SECONDS="30")
    log_path = tmp_path / "server.log"
    with running_service(bundle_dir, log_path, env) as (process, base):
        yield process, base, log_path


def test_real_server_serves_drains_on_sigterm_and_logs_no_patient_data(server, reference, image_paths):
    process, base, log_path = server
    headers = {"x-api-key": KEY}
    path = image_paths[0]
    expected = reference.answer(Image.open(path))

    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.post("/v1/diagnose", content=png_bytes(path),
                           headers={"content-type": "image/png"}).status_code == 401
        body = client.post("/v1/diagnose", files={"file": ("x.png", png_bytes(path), "image/png")},
                           headers=headers).json()
        assert (body["diagnosis"], body["decision"]) == (expected["diagnosis"], expected["decision"])
        assert body["shield_logit"] == pytest.approx(expected["shield_logit"], abs=1e-6)
        dicom = make_dicom(np.asarray(Image.open(path)))
        from_dicom = client.post("/diagnose", content=dicom,
                                 headers={**headers, "content-type": "application/dicom"}).json()
        assert from_dicom["shield_logit"] == body["shield_logit"]
        assert client.post("/diagnose", content=dicom[:500],
                           headers={**headers, "content-type": "application/dicom"}).status_code == 422
        metrics = client.get("/metrics").text
        assert 'aegis_model_info{name="aegis-tiny",provider="CPUExecutionProvider",requested_device="cpu",version="1.0.0"} 1.0' in metrics

    # an in-flight request (it waits max_batch_wait_seconds for company) when SIGTERM arrives
    in_flight = {}

    def post():
        in_flight["response"] = httpx.post(f"{base}/v1/diagnose", content=png_bytes(path), timeout=30,
                                           headers={**headers, "content-type": "image/png"})

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(0.1)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    ready = httpx.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    during_drain = httpx.post(f"{base}/v1/diagnose", content=png_bytes(path), timeout=30,
                              headers={**headers, "content-type": "image/png"})
    assert during_drain.status_code == 200  # the load balancer may still send traffic while it notices
    thread.join(30)
    assert in_flight["response"].status_code == 200
    assert process.wait(30) == 0
    assert time.monotonic() - sent >= 1.0  # AEGIS_DRAIN_SECONDS

    lines = log_path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    events = [r["event"] for r in records]
    assert "service_ready" in events and "draining" in events and "service_stopped" in events
    assert any(r.get("format") == "dicom" for r in records)
    text = "\n".join(lines)
    for value in PATIENT.values():
        assert value not in text
    assert KEY not in text

    # the decision record: the writer waits 30 s for company, so these rows exist only through the SIGTERM flush
    answered = [body["request_id"], from_dicom["request_id"], in_flight["response"].json()["request_id"],
                during_drain.json()["request_id"]]
    record = log_path.parent / "records.sqlite"
    with sqlite3.connect(record) as connection:
        rows = connection.execute("SELECT request_id, input_format, key_id FROM decisions ORDER BY id").fetchall()
    assert sorted(r[0] for r in rows) == sorted(answered)
    assert {r[1] for r in rows} == {"png", "dicom"} and {r[2] for r in rows} == {key_id(KEY.encode())}
    stored = b"".join(p.read_bytes() for p in log_path.parent.glob("records.sqlite*"))
    assert all(value.encode() not in stored for value in PATIENT.values()) and KEY.encode() not in stored
