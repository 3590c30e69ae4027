"""Benchmark: the memory one hostile image costs a real server (issue 16, item 7: "bombs under the pixel cap").

Starts `python -m service` (from `--repo`, default this checkout) on loopback, reads its idle resident memory, resets
the kernel's peak counter (/proc/PID/clear_refs, Linux), sends the image(s), and reports the peak resident memory
(VmHWM) over the idle process, with each answer's status and time. Prints one JSON object; not a timed test.

    .venv/bin/python -m benchmarks.decode_memory                                  # the review's bomb, default limits
    .venv/bin/python -m benchmarks.decode_memory --env AEGIS_MAX_PIXELS=50000000  # the old cap: decoded, bounded
    .venv/bin/python -m benchmarks.decode_memory --concurrent 10 --env AEGIS_MAX_PIXELS=50000000

The review's bomb is a 7000 x 7000 16-bit PNG of zeros (~95 KB on the wire, 98 MB decoded). `--repo DIR` runs the
server of another checkout (e.g. `git archive REV | tar -x -C DIR`) to measure a "before".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def bomb_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(repo: Path, body: bytes, concurrent: int, env_overrides: dict[str, str]) -> dict:
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="aegis-decode-memory-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}
    env.update(AEGIS_AUTH_DISABLED="true", AEGIS_RECORD_ENABLED="false", AEGIS_LOG_LEVEL="WARNING",
               AEGIS_REQUEST_TIMEOUT_SECONDS="120", PYTHONPATH=str(repo))
    env.update(env_overrides)
    with open(folder / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=repo, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError((folder / "server.log").read_text())
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        httpx.get(f"{base}/healthz", timeout=5)
        time.sleep(1.0)
        idle_kib = status_kib(server.pid, "VmRSS")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        answers: list[tuple[int, float, str]] = []

        def send() -> None:
            started = time.monotonic()
            response = httpx.post(f"{base}/v1/diagnose", content=body, headers={"content-type": "image/png"},
                                  timeout=300)
            reason = response.json().get("reason", "") if response.status_code != 200 else ""
            answers.append((response.status_code, round(time.monotonic() - started, 3), reason))

        threads = [threading.Thread(target=send) for _ in range(concurrent)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak_kib = status_kib(server.pid, "VmHWM")
        return {"idle_rss_mb": round(idle_kib / 1024, 1), "peak_rss_mb": round(peak_kib / 1024, 1),
                "peak_over_idle_mb": round((peak_kib - idle_kib) / 1024, 1), "answers": sorted(answers)}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=7000, help="width = height of the 16-bit PNG of zeros")
    parser.add_argument("--concurrent", type=int, default=1, help="copies sent at once")
    parser.add_argument("--env", action="append", default=[], metavar="AEGIS_X=V", help="server setting (repeat)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server runs")
    args = parser.parse_args(argv)
    body = bomb_png(args.size)
    overrides = dict(item.split("=", 1) for item in args.env)
    result = measure(args.repo.resolve(), body, args.concurrent, overrides)
    print(json.dumps({"image": f"{args.size} x {args.size} 16-bit PNG", "body_bytes": len(body),
                      "concurrent": args.concurrent, "settings": overrides, "repo": str(args.repo), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
