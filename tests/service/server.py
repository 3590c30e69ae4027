"""A real `python -m service` process on a free loopback port, for the tests that need a real server (uvicorn,
signals, a browser)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.service.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(bundle_dir: Path, log_path: Path, env: dict[str, str], timeout: float = 60
                    ) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start the service with `env` (on top of this environment without its AEGIS_* variables), wait for /readyz,
    yield (process, base URL); kill it afterwards if it still runs."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}
    full_env.update(PYTHONUNBUFFERED="1", **env)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--bundle",
                                    str(bundle_dir)], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
