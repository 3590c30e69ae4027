"""The DICOM node (C-STORE SCP, pynetdicom): pynetdicom's SCU sends real DICOMs built from the sample X-rays over a
loopback port; each is diagnosed in-process like /v1/diagnose and recorded; refused instances get a failure status
with a reason; unknown callers are rejected at association; no patient data in the logs or the record."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (BasicTextSRStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage,
                                  Verification)
from sqlalchemy import create_engine, text

from service.dicom_node import DicomNode
from tests.service.conftest import REPO, SAMPLES, make_settings, serve
from tests.service.dicom_factory import PATIENT, make_dicom, make_document, undecodable_transfer_syntax

CALLER = "MODALITY"


def dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def associate(port: int, calling: str = CALLER, called: str = "AEGIS", contexts=None):
    ae = AE(ae_title=calling)
    for abstract, syntaxes in contexts or [(Verification, None), (SecondaryCaptureImageStorage, None),
                                           (EncapsulatedPDFStorage, None), (BasicTextSRStorage, None)]:
        ae.add_requested_context(abstract, syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called)


def images(image_paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L")) for p in [*SAMPLES, *image_paths[:2]]]


@pytest.fixture(scope="module")
def node(bundle_dir):
    """The node on a free loopback port, sharing a started service's state (so /v1/diagnose gives references)."""
    with serve(bundle_dir, dicom_allowed_calling_aets=(CALLER, "PACS")) as harness:
        dicom_node = DicomNode(harness.state, harness.loop)
        _, port = dicom_node.start("127.0.0.1", 0)
        try:
            yield harness, port
        finally:
            dicom_node.stop()


def stored_rows(harness, source: str = "c-store") -> list[dict]:
    harness.state.recorder.flush()
    rows = harness.get("/v1/decisions", params={"limit": 1000}).json()["decisions"]
    return [row for row in rows if row["source"] == source]


def test_echo_and_store_real_xrays_answer_like_diagnose_and_are_recorded(node, image_paths):
    harness, port = node
    pixels = images(image_paths)
    before = len(stored_rows(harness))
    assoc = associate(port)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        statuses = [assoc.send_c_store(dataset(make_dicom(png))) for png in pixels]
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [0x0000] * len(pixels)
    rows = stored_rows(harness)[before:]
    assert len(rows) == len(pixels) and len({row["request_id"] for row in rows}) == len(pixels)
    for row, png in zip(rows, pixels):  # one association sends one instance after the other: rows in order
        buffer = io.BytesIO()
        Image.fromarray(png).save(buffer, format="PNG")
        reference = harness.post_image(buffer.getvalue()).json()
        assert (row["diagnosis"], row["decision"]) == (reference["diagnosis"], reference["decision"])
        assert row["shield_logit"] == pytest.approx(reference["shield_logit"], abs=1e-5)
        assert (row["input_format"], row["input_width"], row["input_height"]) == ("dicom", *png.shape[::-1])
        assert row["key_id"] is None


def test_refused_instances_get_a_failure_status_with_a_reason(node, image_paths):
    harness, port = node
    png = images(image_paths)[0]
    cases = [  # (instance, status, words of the Error Comment)
        (make_dicom(np.stack([png, png, png]), frames=3), 0xC000, "multi-frame"),
        (make_document("pdf"), 0x0122, "Encapsulated PDF Storage"),
        (make_document("sr"), 0x0122, "Basic Text SR Storage"),
    ]
    before = len(stored_rows(harness))
    assoc = associate(port)
    try:
        for data, status, words in cases:
            answer = assoc.send_c_store(dataset(data))
            assert answer.Status == status and words in answer.ErrorComment, answer
            assert len(answer.ErrorComment) <= 64
        assert assoc.send_c_store(dataset(make_dicom(png))).Status == 0x0000  # the association still serves
    finally:
        assoc.release()
    assert len(stored_rows(harness)) == before + 1  # refusals are not decisions


def test_a_transfer_syntax_without_decoder_is_refused_at_negotiation(node, image_paths):
    from structlog.testing import capture_logs

    harness, port = node
    compressed = undecodable_transfer_syntax()
    if compressed is None:
        pytest.skip("every compressed transfer syntax has a decoder here")
    png = images(image_paths)[0]
    instance = dataset(make_dicom(None, transfer_syntax=compressed, encapsulated=b"\xff\xd8" * 20,
                                  rows_cols=png.shape))
    with capture_logs() as logs:
        assoc = associate(port, contexts=[(Verification, None), (SecondaryCaptureImageStorage, [compressed])])
        try:
            assert assoc.is_established
            (context,) = assoc.rejected_contexts
            assert context.result == 0x04  # "transfer syntaxes not supported" (PS3.8 9.3.3.2)
            with pytest.raises(ValueError, match="presentation context"):
                assoc.send_c_store(instance)
        finally:
            assoc.release()
    (accepted,) = [entry for entry in logs if entry["event"] == "dicom_association"]
    assert accepted["rejected_transfer_syntaxes"] == [f"Secondary Capture Image Storage: {compressed.name}"]


@pytest.mark.parametrize("calling, called", [("STRANGER", "AEGIS"), (CALLER, "SOMEONE_ELSE")])
def test_unknown_callers_are_rejected_at_association(node, calling, called):
    from structlog.testing import capture_logs

    _, port = node
    with capture_logs() as logs:
        assoc = associate(port, calling=calling, called=called)
        assert assoc.is_rejected and not assoc.is_established
        time.sleep(0.2)  # the acceptor's EVT_REJECTED runs in its own thread
    assert assoc.acceptor.ae_title == called
    rejected = [entry for entry in logs if entry["event"] == "dicom_association"]
    assert rejected and rejected[0]["outcome"] == "rejected" and rejected[0]["calling_ae"] == calling


def test_no_patient_data_in_the_logs_or_the_record(bundle_dir, image_paths, tmp_path, caplog):
    from structlog.testing import capture_logs

    path = tmp_path / "records.sqlite"
    png = images(image_paths)[0]
    parts = [make_dicom(png), make_dicom(np.stack([png, png]), frames=2), make_document("pdf")]
    uids = [dataset(p).SOPInstanceUID for p in parts]
    assert all(value.encode() in part for value in PATIENT.values() for part in parts)
    caplog.set_level("DEBUG")
    with serve(bundle_dir, record_url=f"sqlite:///{path}", dicom_allow_any_calling_aet=True) as harness:
        dicom_node = DicomNode(harness.state, harness.loop)
        _, port = dicom_node.start("127.0.0.1", 0)
        try:
            with capture_logs() as logs:  # inside: the app configures structlog when it is created
                assoc = associate(port)
                statuses = [assoc.send_c_store(dataset(p)).Status for p in parts]
                assoc.release()
        finally:
            dicom_node.stop()
        listed = stored_rows(harness)
    assert statuses == [0x0000, 0xC000, 0x0122] and len(listed) == 1
    instance_lines = [entry for entry in logs if entry["event"] == "dicom_instance"]
    assert sorted(entry["outcome"] for entry in instance_lines) == ["diagnosed", "refused", "refused"]
    assert {entry["calling_ae"] for entry in instance_lines} == {CALLER}
    with create_engine(f"sqlite:///{path}").connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    pynetdicom_lines = caplog.text
    for value in [*PATIENT.values(), "Doe", "PID-4711", *uids]:
        assert value.encode() not in stored, value
        assert value not in json.dumps(listed)
        assert value not in repr(logs), value
        assert value not in pynetdicom_lines, value


def test_python_m_service_dicom_node_serves_records_and_stops_cleanly(bundle_dir, image_paths, tmp_path):
    import httpx

    record = tmp_path / "records.sqlite"
    with socket.socket() as probe:  # a free port for the node's /metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    env = {**os.environ, "AEGIS_BUNDLE_DIR": str(bundle_dir), "AEGIS_DICOM_PORT": "0",
           "AEGIS_DICOM_METRICS_PORT": str(metrics_port),
           "AEGIS_DICOM_HOST": "127.0.0.1", "AEGIS_DICOM_AE_TITLE": "AEGIS_TEST", "AEGIS_INTRA_OP_THREADS": "1",
           "AEGIS_RECORD_URL": f"sqlite:///{record}", "AEGIS_DICOM_ALLOWED_CALLING_AETS": CALLER}
    env.pop("AEGIS_DICOM_ALLOW_ANY_CALLING_AET", None)
    process = subprocess.Popen([sys.executable, "-m", "service.dicom_node"], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        for line in process.stdout:  # JSON lines: wait for the node to say where it listens
            lines.append(line)
            if '"dicom_node_ready"' in line:
                break
        ready = json.loads(lines[-1])
        assert ready["event"] == "dicom_node_ready" and ready["ae_title"] == "AEGIS_TEST", lines
        assoc = associate(ready["port"], called="AEGIS_TEST")
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(dataset(make_dicom(images(image_paths)[0]))).Status == 0x0000
        assoc.release()
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'aegis_diagnoses_total{' in metrics and "aegis_ready 1.0" in metrics
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, rest
    records = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.startswith("{")]
    assert {"dicom_node_ready", "dicom_instance", "dicom_node_stopping", "service_stopped"} <= \
           {r["event"] for r in records}
    with sqlite3.connect(record) as connection:
        rows = connection.execute("SELECT source, input_format FROM decisions").fetchall()
    assert rows == [("c-store", "dicom")]  # written by the shutdown flush at the latest


def test_the_node_needs_an_explicit_caller_policy(bundle_dir, monkeypatch, capsys):
    from service.dicom_node import main
    from service.main import new_state

    with pytest.raises(ValueError, match="AEGIS_DICOM_ALLOWED_CALLING_AETS"):
        DicomNode(new_state(make_settings(bundle_dir)), None)
    for name in ("AEGIS_DICOM_ALLOWED_CALLING_AETS", "AEGIS_DICOM_ALLOW_ANY_CALLING_AET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--bundle", str(bundle_dir)]) == 2
    assert "AEGIS_DICOM_ALLOWED_CALLING_AETS" in capsys.readouterr().err
