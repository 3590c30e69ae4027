"""HTTP-level limits of a real `python -m service` process on loopback, before any authentication (issue 16,
item 7, outside review): header size and count, header timeout (slowloris), connection limit; failed logins in the
access log with client address and reason; library warnings as JSON lines without DICOM values; metrics on their
own port."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest

from tests.service.dicom_factory import make_dicom
from tests.service.real_server import free_port, real_server

KEY = "http-limits-test-key"
HEADER_TIMEOUT = 1.0
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module", params=["h11", "httptools"])
def server(request, bundle_dir, tmp_path_factory):
    """One real server per HTTP protocol: both are guarded (service/http.py)."""
    metrics_port = free_port()
    with real_server(bundle_dir, tmp_path_factory.mktemp("limits"), AEGIS_API_KEYS=KEY, AEGIS_HTTP=request.param,
                     AEGIS_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT), AEGIS_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                     AEGIS_MAX_HEADER_BYTES="8192", AEGIS_MAX_HEADER_COUNT="50",
                     AEGIS_METRICS_PORT=str(metrics_port)) as (process, base, log_path):
        yield process, base, log_path, metrics_port


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection or `timeout` passes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def test_a_huge_header_is_refused_before_authentication(server):
    _, base, _, _ = server
    with _connect(base) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000_000 + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection while the header was still coming: what we want
        answer = _response(sock)
    assert _status(answer) in (0, 400, 431), answer[:200]


def test_a_head_growing_past_the_byte_limit_is_refused_and_a_large_body_is_not(server):
    _, base, _, _ = server
    lines = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 600) for i in range(20))  # ~12 KB in 20 headers (count ok)
    with _connect(base) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for start in range(0, len(lines), 2000):  # the head arrives in reads of 2 KB, each under the limit
                sock.sendall(lines[start:start + 2000])
                time.sleep(0.05)
            sock.sendall(b"Connection: close\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _status(_response(sock)) in (400, 431)  # h11 says 400, the httptools guard 431
    body = b"\x00" * 200_000  # a head split over two reads, then a body far larger than the head limit
    with _connect(base) as sock:
        sock.sendall(b"POST /v1/diagnose HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.1)
        sock.sendall(b"x-api-key: %s\r\ncontent-type: image/png\r\ncontent-length: %d\r\nConnection: close\r\n\r\n"
                     % (KEY.encode(), len(body)) + body)
        assert _status(_response(sock)) == 415  # read and judged (not PNG bytes), not cut as a large head


def test_too_many_headers_are_431(server):
    _, base, _, _ = server
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(200))  # ~2 KB: under the byte limit, over the count
    with _connect(base) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n")
        answer = _response(sock)
    assert _status(answer) == 431, answer[:300]


def test_slowloris_and_idle_connections_are_closed_after_the_header_timeout(server):
    _, base, _, _ = server
    with _connect(base) as slow, _connect(base) as idle:
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed_after = None
        for _ in range(40):  # one header byte every 0.25 s for up to 10 s
            try:
                slow.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            slow.settimeout(0.25)
            try:
                if slow.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and closed_after < HEADER_TIMEOUT + 2, closed_after
        idle_answer = _response(idle, timeout=HEADER_TIMEOUT + 3)
        assert time.monotonic() - started < HEADER_TIMEOUT + 4
        assert _status(idle_answer) in (0, 408)


def test_connections_beyond_the_limit_get_503(server):
    _, base, _, _ = server
    held = [_connect(base) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # incomplete heads keep the connections open
        time.sleep(0.2)
        with _connect(base) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _status(_response(extra, timeout=5)) == 503
    finally:
        for sock in held:
            sock.close()
    time.sleep(HEADER_TIMEOUT + 0.5)
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # recovered


def test_failed_logins_are_logged_with_client_and_reason_never_the_key(server):
    _, base, log_path, _ = server
    wrong = "wrong-key-that-must-not-be-logged"
    assert httpx.get(f"{base}/v1/model", headers={"x-api-key": wrong}, timeout=5).status_code == 401
    assert httpx.get(f"{base}/v1/model", timeout=5).status_code == 401
    time.sleep(0.3)
    text = log_path.read_text(encoding="utf-8")
    failures = [json.loads(line) for line in text.splitlines() if '"auth_failed"' in line]
    assert {f["reason"] for f in failures} >= {"invalid_key", "missing_key"}
    assert all(f["client"] == "127.0.0.1" for f in failures)
    assert wrong not in text


def test_metrics_are_on_their_own_port_and_not_on_the_api_port(server):
    _, base, _, metrics_port = server
    assert httpx.get(f"{base}/metrics", headers={"x-api-key": KEY}, timeout=5).status_code == 404
    body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert "aegis_model_info{" in body


def test_library_warnings_are_json_lines_without_dicom_values(server, image_paths):
    import io
    import warnings

    from PIL import Image
    from pydicom import config, dcmread

    _, base, log_path, _ = server
    secret = "DOE^JANE-SECRET"
    ds = dcmread(io.BytesIO(make_dicom(np.asarray(Image.open(image_paths[0])))))
    buffer = io.BytesIO()
    config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # here, in the test, the same warnings are expected: the file is bad
            ds.SpecificCharacterSet = secret  # pydicom warns "Unknown encoding '<value>'" when the service reads it
            ds.save_as(buffer)
    finally:
        config.settings.writing_validation_mode = config.WARN
    response = httpx.post(f"{base}/v1/diagnose", content=buffer.getvalue(), timeout=10,
                          headers={"x-api-key": KEY, "content-type": "application/dicom"})
    assert response.status_code == 200, response.text
    time.sleep(0.3)
    lines = log_path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        json.loads(line)  # every line is one JSON object
    assert secret not in "\n".join(lines)
    warned = [json.loads(line) for line in lines if '"library_warning"' in line]
    assert warned and warned[0]["source"] == "pydicom" and warned[0]["message"] is None
