"""The decision record: one row per answered decision, on SQLite and on a real PostgreSQL, written off the request
path, flushed at shutdown, free of patient data, readable through GET /v1/decisions and the export command."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, select, text

from service.cli import main as cli
from service.record import DecisionRecorder, ModelFacts, RecordError
from service.record.schema import decisions, metadata
from service.record.store import (DecisionFilter, count_decisions, create_record_engine, current_revision,
                                  delete_older_than, head_revision, query_decisions, upgrade_schema)
from tests.service.conftest import png_bytes, serve
from tests.service.dicom_factory import PATIENT, make_dicom

KEY = "record-test-key-42"


def rows_of(url: str) -> list[dict]:
    engine = create_record_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(select(decisions).order_by(decisions.c.id))]
    finally:
        engine.dispose()


def test_the_migrations_create_exactly_the_table_the_code_writes(any_record_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_record_engine(any_record_url)
    try:
        assert current_revision(engine) is None
        upgrade_schema(engine)
        upgrade_schema(engine)  # idempotent
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    finally:
        engine.dispose()


def test_every_answer_under_concurrent_load_has_exactly_one_row(bundle_dir, image_paths, any_record_url):
    """Requests in concurrent waves; the service is stopped right after the last answer. The writer flushes only
    full batches of 10 here (the time trigger is 30 s away), so the last 4 rows exist only if the shutdown flush
    writes them: exactly one row per 200 answer (by request id), with the answer's own values."""
    data = [png_bytes(p) for p in image_paths]
    answers = []
    with serve(bundle_dir, record_url=any_record_url, auth_disabled=False, api_keys=KEY, max_batch_size=4,
               record_batch_size=10, record_flush_seconds=30) as harness:
        for wave in range(6):
            calls = [dict(method="POST", url="/v1/diagnose", content=data[i % len(data)],
                          headers={"content-type": "image/png", "x-api-key": KEY}) for i in range(24)]
            answers += [(r, calls[i]["content"]) for i, r in enumerate(harness.gather(calls))]
        manifest = harness.state.bundle.manifest
    ok = [(r.json(), body) for r, body in answers if r.status_code == 200]
    assert len(ok) == len(answers) == 144
    rows = rows_of(any_record_url)
    by_id = {row["request_id"]: row for row in rows}
    assert len(rows) == len(by_id) == len(ok)  # one row per answer, none twice
    for answer, body in ok:
        row = by_id[answer["request_id"]]
        assert (row["diagnosis"], row["decision"]) == (answer["diagnosis"], answer["decision"])
        assert row["shield_logit"] == answer["shield_logit"] and row["threshold"] == answer["threshold"]
        assert row["probabilities"] == answer["probabilities"]
        assert row["image_sha256"] == hashlib.sha256(body).hexdigest() and row["input_bytes"] == len(body)
        assert (row["input_format"], row["input_width"], row["input_height"]) == ("png", 128, 128)
        assert (row["model_name"], row["model_version"]) == (manifest.name, manifest.version)
        assert row["model_sha256"] == manifest.files[manifest.onnx.file]
        assert row["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:8] and row["source"] == "api"
        assert row["decided_at"].tzinfo is not None
    times = [row["decided_at"] for row in rows]
    assert times == sorted(times) and datetime.now(timezone.utc) - times[0] < timedelta(minutes=10)


def test_no_patient_data_in_the_record_or_the_logs(bundle_dir, image_paths, tmp_path):
    from structlog.testing import capture_logs

    path = tmp_path / "records.sqlite"
    dicom = make_dicom(np.asarray(Image.open(image_paths[0])))
    assert all(value.encode() in dicom for value in PATIENT.values())
    with capture_logs() as logs:
        with serve(bundle_dir, record_url=f"sqlite:///{path}") as harness:
            assert harness.post_image(dicom, content_type="application/dicom").status_code == 200
            assert harness.request("POST", "/v1/diagnose", files={"file": ("Doe_Jane_PID-4711.dcm", dicom,
                                                                          "application/dicom")}).status_code == 200
            harness.state.recorder.flush()
            listed = harness.get("/v1/decisions").json()["decisions"]
    assert [row["input_format"] for row in listed] == ["dicom", "dicom"]
    with create_engine(f"sqlite:///{path}").connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))  # every byte in the main file
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for value in [*PATIENT.values(), "Doe_Jane", "Doe", "PID-4711"]:
        assert value.encode() not in stored, value
        assert value not in json.dumps(listed)
        assert value not in repr(logs)


def test_an_unwritable_record_still_answers_and_counts_the_loss(bundle_dir, image_paths, tmp_path):
    from structlog.testing import capture_logs

    url = f"sqlite:///{tmp_path}/records.sqlite"
    with serve(bundle_dir, record_url=url, record_flush_seconds=0.01) as harness:
        with create_engine(url).begin() as connection:
            connection.execute(text("DROP TABLE decisions"))  # the database loses the table under the service
        with capture_logs() as logs:
            response = harness.post_image(png_bytes(image_paths[0]))
            assert response.status_code == 200
            harness.state.recorder.flush()
        assert harness.sample("aegis_record_errors_total", {"reason": "write_failed"}) == 1
        assert harness.sample("aegis_records_written_total") == 0
    lost = [entry for entry in logs if entry["event"] == "record_not_written"]
    assert lost and lost[0]["request_ids"] == [response.json()["request_id"]] and "no such table" in lost[0]["error"]


def _row(request_id: str, decided_at: datetime, decision: str = "accept", diagnosis: str = "NORMAL") -> dict:
    return {"decided_at": decided_at, "request_id": request_id, "source": "api", "model_name": "m",
            "model_version": "1", "model_sha256": "0" * 64, "image_sha256": "1" * 64, "input_format": "png",
            "input_width": 8, "input_height": 8, "input_bytes": 10, "diagnosis": diagnosis,
            "probabilities": {"NORMAL": 0.5, "PNEUMONIA": 0.5}, "decision": decision, "shield_logit": 1.0,
            "threshold": 0.0, "key_id": None}


def _recorder(url: str, **options) -> DecisionRecorder:
    engine = create_record_engine(url)
    upgrade_schema(engine)
    return DecisionRecorder(engine, ModelFacts("m", "1", "0" * 64), **options)


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(process_collector=False)
    recorder = _recorder(f"sqlite:///{tmp_path}/r.sqlite", queue_size=2)
    recorder.metrics = metrics
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    for i in range(5):  # the writer is not started: nothing drains the queue
        recorder.submit(_row(f"r{i}", now))
    assert time.perf_counter() - started < 0.5
    assert metrics.registry.get_sample_value("aegis_record_errors_total", {"reason": "queue_full"}) == 3
    recorder.start().close()
    assert [r["request_id"] for r in rows_of(f"sqlite:///{tmp_path}/r.sqlite")] == ["r0", "r1"]


def test_retention_deletes_old_rows_periodically(any_record_url):
    now = datetime.now(timezone.utc)
    recorder = _recorder(any_record_url, flush_seconds=0.01)
    recorder.start()
    for i, age in enumerate([40, 31, 29, 1, 0]):
        recorder.submit(_row(f"r{i}", now - timedelta(days=age)))
    recorder.close()
    assert delete_older_than(create_record_engine(any_record_url), days=30, now=now) == 2
    assert [r["request_id"] for r in rows_of(any_record_url)] == ["r2", "r3", "r4"]

    periodic = _recorder(any_record_url, retention_days=2, retention_check_seconds=0.05, flush_seconds=0.01)
    periodic.start()
    deadline = time.monotonic() + 10
    while len(rows_of(any_record_url)) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    periodic.close()
    assert [r["request_id"] for r in rows_of(any_record_url)] == ["r3", "r4"]


def test_filters_and_pages_mean_the_same_on_both_backends(any_record_url):
    base = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    recorder = _recorder(any_record_url, batch_size=7).start()
    for i in range(30):
        recorder.submit(_row(f"r{i:02d}", base + timedelta(hours=i), decision="reject" if i % 3 == 0 else "accept",
                             diagnosis="PNEUMONIA" if i % 2 else "NORMAL"))
    recorder.close()
    engine = create_record_engine(any_record_url)
    try:
        paris = timezone(timedelta(hours=1))
        window = DecisionFilter(since=(base + timedelta(hours=5)).astimezone(paris),
                                until=(base + timedelta(hours=20)).replace(tzinfo=None))  # naive = UTC
        got = [r["request_id"] for r in query_decisions(engine, window, limit=1000)]
        assert got == [f"r{i:02d}" for i in range(5, 20)]
        rejected_pneumonia = DecisionFilter(decision="reject", diagnosis="PNEUMONIA")
        assert [r["request_id"] for r in query_decisions(engine, rejected_pneumonia)] == \
            [f"r{i:02d}" for i in range(30) if i % 3 == 0 and i % 2]
        pages, after = [], 0
        while True:
            page = query_decisions(engine, DecisionFilter(), after_id=after, limit=4)
            pages.append(page)
            if len(page) < 4:
                break
            after = page[-1]["id"]
        assert [r["request_id"] for p in pages for r in p] == [f"r{i:02d}" for i in range(30)]
        assert count_decisions(engine, DecisionFilter(decision="reject")) == 10
        assert query_decisions(engine, DecisionFilter(request_id="r07"))[0]["decided_at"] == base + timedelta(hours=7)
    finally:
        engine.dispose()


def test_decisions_endpoint_needs_a_key_filters_and_pages(bundle_dir, image_paths, reject_all_bundle, tmp_path):
    url = f"sqlite:///{tmp_path}/records.sqlite"
    headers = {"x-api-key": KEY}
    data = png_bytes(image_paths[0])
    with serve(reject_all_bundle, record_url=url, auth_disabled=False, api_keys=KEY) as harness:
        ids = [harness.post_image(data, headers=headers).json()["request_id"] for _ in range(5)]
        harness.state.recorder.flush()
        assert harness.get("/v1/decisions").status_code == 401
        assert harness.get("/v1/decisions", headers={"x-api-key": "wrong"}).status_code == 401
        seen, after = [], 0
        while True:
            page = harness.get("/v1/decisions", params={"limit": 2, "after_id": after}, headers=headers).json()
            seen += [r["request_id"] for r in page["decisions"]]
            if page["next_after_id"] is None:
                break
            after = page["next_after_id"]
        assert seen == ids
        assert harness.get("/v1/decisions", params={"decision": "accept"}, headers=headers).json()["decisions"] == []
        future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        assert harness.get("/v1/decisions", params={"since": future}, headers=headers).json()["decisions"] == []
        assert len(harness.get("/v1/decisions", params={"until": future}, headers=headers).json()["decisions"]) == 5
        assert harness.get("/v1/decisions", params={"decision": "maybe"}, headers=headers).status_code == 422
        assert harness.get("/v1/decisions", params={"limit": 0}, headers=headers).status_code == 422
    with serve(bundle_dir, record_enabled=False) as harness:
        assert harness.post_image(data).status_code == 200
        refused = harness.get("/v1/decisions")
        assert refused.status_code == 503 and refused.json()["reason"] == "record_disabled"


def test_an_old_schema_is_refused_unless_migrations_run(bundle_dir, tmp_path):
    url = f"sqlite:///{tmp_path}/records.sqlite"
    create_record_engine(url).connect().close()  # an empty database: no schema yet
    with pytest.raises(RecordError, match="service.cli migrate"):
        with serve(bundle_dir, record_url=url, record_migrate=False):
            pass
    assert cli(["migrate", "--db", url]) == 0
    assert current_revision(create_record_engine(url)) == head_revision()
    with serve(bundle_dir, record_url=url, record_migrate=False) as harness:
        assert harness.get("/readyz").status_code == 200
    with pytest.raises(RecordError, match="in-memory"):
        create_record_engine("sqlite://")


def test_export_writes_every_row_as_csv_or_jsonl_from_the_database(bundle_dir, image_paths, any_record_url,
                                                                    tmp_path):
    import csv

    with serve(bundle_dir, record_url=any_record_url) as harness:
        for path in image_paths:
            assert harness.post_image(png_bytes(path)).status_code == 200
    stored = rows_of(any_record_url)
    assert len(stored) == len(image_paths)
    assert cli(["export-decisions", "--db", any_record_url, "--out", str(tmp_path / "all.jsonl")]) == 0
    exported = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [e["request_id"] for e in exported] == [r["request_id"] for r in stored]
    assert exported[0]["probabilities"] == stored[0]["probabilities"]
    assert datetime.fromisoformat(exported[0]["decided_at"]) == stored[0]["decided_at"]
    assert cli(["export-decisions", "--db", any_record_url, "--format", "csv", "--decision", "reject",
                "--out", str(tmp_path / "rejected.csv")]) == 0
    with open(tmp_path / "rejected.csv", newline="") as handle:
        rejected = list(csv.DictReader(handle))
    assert [r["request_id"] for r in rejected] == [r["request_id"] for r in stored if r["decision"] == "reject"]
    assert all(json.loads(r["probabilities"]).keys() == {"NORMAL", "PNEUMONIA"} for r in rejected)


def test_export_refuses_a_missing_record(tmp_path, capsys):
    assert cli(["export-decisions", "--db", f"sqlite:///{tmp_path}/none.sqlite"]) == 2
    assert "no decision record" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()


def test_key_ids_are_stable_short_and_not_the_key():
    from service.security import key_id, matching_key

    keys = (b"alpha-key", b"beta-key")
    assert matching_key("beta-key", keys) == b"beta-key" and matching_key("gamma", keys) is None
    assert key_id(b"alpha-key") == hashlib.sha256(b"alpha-key").hexdigest()[:8] != key_id(b"beta-key")
    assert len(key_id(b"alpha-key")) == 8


def test_close_waits_for_rows_submitted_from_other_threads(tmp_path):
    """DICOM paths call record() from their own threads: every row handed over before close() is written."""
    url = f"sqlite:///{tmp_path}/r.sqlite"
    recorder = _recorder(url, flush_seconds=0.01).start()
    now = datetime.now(timezone.utc)

    def send(t):
        for i in range(50):
            recorder.submit(_row(f"t{t}-{i}", now))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    assert sorted(r["request_id"] for r in rows_of(url)) == sorted(f"t{t}-{i}" for t in range(4) for i in range(50))
    assert Path(tmp_path / "r.sqlite").is_file()
