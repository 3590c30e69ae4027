"""Service fixtures: an in-process harness (httpx over ASGI, lifespan entered), bundle variants, the offline reference
(models/reference.py)."""

from __future__ import annotations

import asyncio
import io
import shutil
import tempfile
import threading
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.bundle import load_bundle, write_manifest
from models.reference import OfflineReference

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.png"))


class Harness:
    """Runs an app's lifespan on a private event loop thread; sync helpers send requests through httpx's ASGI
    transport, `gather` sends many at once (concurrently, on the app's loop)."""

    def __init__(self, app, lifespan: bool = True):
        self.app = app
        self.lifespan = lifespan
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stack = AsyncExitStack()

    @property
    def state(self):
        return self.app.state.aegis

    @property
    def registry(self):
        return self.app.state.metrics.registry

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _enter(self):
        if self.lifespan:
            await self.stack.enter_async_context(self.app.router.lifespan_context(self.app))
        self.client = await self.stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://aegis", timeout=60))

    def __enter__(self) -> Harness:
        self.thread.start()
        self.run(self._enter())
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        return self.run(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post_image(self, data: bytes, content_type: str = "image/png", url: str = "/v1/diagnose",
                   headers: dict | None = None) -> httpx.Response:
        return self.request("POST", url, content=data, headers={"content-type": content_type, **(headers or {})})

    def gather(self, calls: list[dict]) -> list[httpx.Response]:
        async def all_of():
            return await asyncio.gather(*(self.client.request(**call) for call in calls))

        return self.run(all_of())

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


def record_url() -> str:
    """A fresh SQLite decision record in a temporary folder (never the default ./aegis-records.sqlite)."""
    return f"sqlite:///{tempfile.mkdtemp(prefix='aegis-record-')}/records.sqlite"


def make_settings(bundle_dir, **overrides):
    from service.config import Settings

    values = dict(bundle_dir=bundle_dir, auth_disabled=True, intra_op_threads=1, max_batch_size=8,
                  max_batch_wait_seconds=0.002, log_level="INFO", record_url=record_url())
    values.update(overrides)
    return Settings(_env_file=None, **values)


def serve(bundle_dir, **overrides) -> Harness:
    from service.main import create_app

    return Harness(create_app(make_settings(bundle_dir, **overrides)))


def png_bytes(path) -> bytes:
    return Path(path).read_bytes()


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def copy_bundle(src: Path, dst: Path, **manifest_updates) -> Path:
    shutil.copytree(src, dst)
    manifest = load_bundle(dst).manifest
    write_manifest(dst, manifest.model_copy(update=manifest_updates))
    load_bundle(dst)  # still a valid bundle
    return dst


@pytest.fixture(scope="session")
def bundle_dir(tiny_bundle_dir) -> Path:
    return tiny_bundle_dir


@pytest.fixture(scope="session")
def reference(bundle_dir) -> OfflineReference:
    return OfflineReference(bundle_dir)


@pytest.fixture(scope="session")
def image_paths(xray_paths) -> list[Path]:
    """Real test-split X-rays of both classes plus the committed samples."""
    return [*xray_paths, *SAMPLES]


@pytest.fixture(scope="session")
def reject_all_bundle(bundle_dir, tmp_path_factory) -> Path:
    """The tiny bundle with unreachable thresholds: every answer is a rejection."""
    manifest = load_bundle(bundle_dir).manifest
    return copy_bundle(bundle_dir, tmp_path_factory.mktemp("strict") / "bundle",
                       thresholds={c: 1e9 for c in manifest.classes})


@pytest.fixture(scope="session")
def accept_all_bundle(bundle_dir, tmp_path_factory) -> Path:
    manifest = load_bundle(bundle_dir).manifest
    return copy_bundle(bundle_dir, tmp_path_factory.mktemp("lenient") / "bundle",
                       thresholds={c: -1e9 for c in manifest.classes})


@pytest.fixture(scope="module")
def service(bundle_dir):
    with serve(bundle_dir) as harness:
        yield harness


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """AEGIS_TEST_POSTGRES_URL (set by .ci/run from scripts/ci-postgres.sh): a role that may create databases.
    Missing: the test fails in CI and is skipped elsewhere."""
    import os

    url = os.environ.get("AEGIS_TEST_POSTGRES_URL")
    if not url:
        message = "a PostgreSQL server is required: export AEGIS_TEST_POSTGRES_URL=\"$(bash scripts/ci-postgres.sh)\""
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture()
def postgres_url(postgres_server_url):
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"aegis_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_record_url(request, tmp_path) -> str:
    """The decision record's two backends: a SQLite file, and a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/records.sqlite"
    return request.getfixturevalue("postgres_url")
