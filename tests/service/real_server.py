"""Start one real `python -m service` process on 127.0.0.1 (test helper, not a test module)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.service.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def real_server(bundle_dir, folder: Path, ready_path: str = "/readyz", **env_overrides: str):
    """Yield (process, base url, log path) once `ready_path` answers 200; the server is killed afterwards.
    `env_overrides` are AEGIS_* variables (the process sees no other AEGIS_* variable of this environment)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}
    env.update(AEGIS_INTRA_OP_THREADS="1", PYTHONUNBUFFERED="1",
               AEGIS_RECORD_URL=f"sqlite:///{folder}/records.sqlite")
    env.update(env_overrides)
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--bundle",
                                    str(bundle_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield process, base, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
