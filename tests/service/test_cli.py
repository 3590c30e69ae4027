"""The batch client (`python -m service.cli diagnose`): walks folders, one row per file with the service's own
answer, retries 503 after Retry-After, stops on a refused key; never sends a file name."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from service.cli import backoff_seconds, find_images, main, post_with_retries, retry_after_seconds
from tests.service.conftest import make_settings, png_bytes
from tests.service.dicom_factory import PATIENT, make_dicom

KEY = "cli-test-key-0123456789"


@pytest.fixture(scope="module")
def live(bundle_dir, tmp_path_factory):
    """The real app behind uvicorn on loopback, in a thread: the CLI talks real HTTP to it."""
    from service.main import create_app

    record = tmp_path_factory.mktemp("cli-record") / "records.sqlite"
    # configure_logs=False: a test's capsys stream must not become the process-wide log stream
    app = create_app(make_settings(bundle_dir, auth_disabled=False, api_keys=KEY, record_url=f"sqlite:///{record}"),
                     configure_logs=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app, record
    server.should_exit = True
    thread.join(30)


@pytest.fixture()
def folder(tmp_path, image_paths):
    """Real X-rays in nested folders, a DICOM with patient data and no extension, a truncated PNG, a non-image."""
    root = tmp_path / "Doe_Jane_study"
    (root / "a" / "b").mkdir(parents=True)
    for i, path in enumerate(image_paths):
        shutil.copy(path, root / ("a" if i % 2 else "a/b") / path.name)
    (root / "IM0001").write_bytes(make_dicom(np.asarray(Image.open(image_paths[0]))))
    (root / "broken.png").write_bytes(png_bytes(image_paths[0])[:200])
    (root / "labels.csv").write_text("path,label\n")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def test_folders_are_walked_for_png_jpeg_and_dicom(folder, image_paths):
    found, skipped = find_images([folder])
    assert {p.name for p in found} == {*(p.name for p in image_paths), "IM0001", "broken.png"}
    assert skipped == 2
    explicit, _ = find_images([folder / "labels.csv"])  # a file named explicitly is always sent
    assert explicit == [folder / "labels.csv"]


def test_a_batch_gives_one_row_per_file_with_the_service_answer(live, folder, reference, image_paths, tmp_path,
                                                                monkeypatch, capsys):
    url, app, record = live
    monkeypatch.setenv("AEGIS_API_KEY", KEY)
    out, summary_path = tmp_path / "results.csv", tmp_path / "summary.json"
    code = main(["diagnose", str(folder), "--url", url, "--out", str(out), "--concurrency", "4",
                 "--summary-json", str(summary_path), "--no-progress"])
    assert code == 1  # one file could not be diagnosed
    with open(out, newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert len(rows) == len(image_paths) + 2
    for path in image_paths:
        row = rows[str(folder / ("a" if image_paths.index(path) % 2 else "a/b") / path.name)]
        expected = reference.answer(Image.open(path))
        assert (row["status"], row["diagnosis"], row["decision"]) == ("200", expected["diagnosis"],
                                                                      expected["decision"])
        assert float(row["shield_logit"]) == pytest.approx(expected["shield_logit"], abs=1e-6)
        assert float(row["p_NORMAL"]) + float(row["p_PNEUMONIA"]) == pytest.approx(1.0)
        assert row["request_id"] and not row["error"]
    dicom = rows[str(folder / "IM0001")]
    assert dicom["status"] == "200" and dicom["diagnosis"]
    broken = rows[str(folder / "broken.png")]
    assert broken["status"] == "422" and broken["error"].startswith("undecodable") and broken["request_id"]
    assert not broken["diagnosis"]

    summary = json.loads(summary_path.read_text())
    answered = [r for r in rows.values() if r["status"] == "200"]
    assert summary["files"] == len(rows) and summary["answered"] == len(answered) and summary["errors"] == 1
    assert summary["errors_by_reason"] == {"undecodable": 1} and summary["skipped_not_images"] == 2
    for name, counts in summary["per_class"].items():
        mine = [r for r in answered if r["diagnosis"] == name]
        rejected = sum(r["decision"] == "reject" for r in mine)
        assert counts == {"answered": len(mine), "rejected": rejected, "rejection_rate": rejected / len(mine)}
    assert summary["images_per_second"] > 0
    assert "rejection rate" in capsys.readouterr().err

    # the service saw neither the file names nor the folder names (raw bodies), nor the DICOM's patient data
    app.state.aegis.recorder.flush()
    stored = b"".join(p.read_bytes() for p in record.parent.iterdir())
    for secret in ["Doe_Jane_study", "IM0001", image_paths[0].name, *PATIENT.values()]:
        assert secret.encode() not in stored


def test_jsonl_output_and_a_refused_key(live, folder, tmp_path, monkeypatch, capsys):
    url, _, _ = live
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["diagnose", str(folder / "a"), "--url", url, "--out", str(out), "--api-key-file", str(key_file),
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(r["probabilities"]) == {"NORMAL", "PNEUMONIA"} for r in rows)
    monkeypatch.setenv("AEGIS_API_KEY", "wrong")
    assert main(["diagnose", str(folder), "--url", url, "--out", str(tmp_path / "x.csv"), "--no-progress"]) == 2
    assert "refused the API key" in capsys.readouterr().err


def test_retry_after_is_read_as_seconds_or_a_date():
    assert retry_after_seconds(httpx.Response(503, headers={"retry-after": "7"})) == 7.0
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 27 < retry_after_seconds(httpx.Response(503, headers={"retry-after": format_datetime(when, usegmt=True)})) <= 30
    assert retry_after_seconds(httpx.Response(503)) is None
    assert retry_after_seconds(httpx.Response(503, headers={"retry-after": "soon"})) is None


def test_503_is_retried_after_retry_after_and_connection_errors_with_backoff(image_paths):
    import asyncio

    calls, waits = [], []
    script = [httpx.ConnectError("refused"), httpx.Response(503, headers={"retry-after": "3"}),
              httpx.Response(503), httpx.Response(200, json={"diagnosis": "NORMAL"})]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        step = script[len(calls) - 1]
        if isinstance(step, Exception):
            raise step
        return step

    async def sleep(seconds):
        waits.append(seconds)

    async def run(retries):
        async with httpx.AsyncClient(base_url="http://aegis", transport=httpx.MockTransport(handler)) as client:
            return await post_with_retries(client, png_bytes(image_paths[0]), retries, sleep)

    response, error, attempts = asyncio.run(run(5))
    assert response.status_code == 200 and error is None and attempts == 4
    assert waits == [backoff_seconds(1), 3.0, backoff_seconds(3)]
    assert all(r.headers["content-type"] == "image/png" and b"filename" not in r.content for r in calls)

    calls.clear(), waits.clear()
    response, error, attempts = asyncio.run(run(1))  # out of retries: the 503 is the answer
    assert response.status_code == 503 and attempts == 2 and waits == [backoff_seconds(1)]


def test_export_through_the_api_gives_the_rows_of_the_database(live, folder, tmp_path, monkeypatch):
    from service.record.store import DecisionFilter, iter_decisions

    url, app, record = live
    monkeypatch.setenv("AEGIS_API_KEY", KEY)
    assert main(["diagnose", str(folder / "a"), "--url", url, "--out", str(tmp_path / "r.csv"), "--no-progress"]) == 0
    app.state.aegis.recorder.flush()
    assert main(["export-decisions", "--api", url, "--out", str(tmp_path / "via-api.jsonl")]) == 0
    via_api = [json.loads(line) for line in (tmp_path / "via-api.jsonl").read_text().splitlines()]
    stored = list(iter_decisions(app.state.aegis.recorder.engine, DecisionFilter()))
    assert len(via_api) == len(stored) >= len(list((folder / "a").glob("*.png")))
    assert [r["request_id"] for r in via_api] == [r["request_id"] for r in stored]
    assert [r["image_sha256"] for r in via_api] == [r["image_sha256"] for r in stored]
    monkeypatch.setenv("AEGIS_API_KEY", "wrong")
    assert main(["export-decisions", "--api", url, "--out", str(tmp_path / "x.jsonl")]) == 2
