"""`python -m service --workers 2` as a real process on 127.0.0.1: both workers serve, /metrics sums the counters of
every worker (also of one that died), /readyz is 200 only while every worker is ready, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import httpx
import pytest
from PIL import Image

from service.soak import ServerProcess, server_environment
from service.workers import WorkerGroup, _pid_of
from tests.service.conftest import png_bytes, record_url

KEY = "workers-test-key"


def _samples(text: str, name: str, **labels) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def _post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    # one connection per request: uvicorn's workers share the listening socket, so the kernel spreads connections
    async def one(body: bytes) -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            return await client.post(f"{url}/v1/diagnose", content=body,
                                     headers={"content-type": "image/png", "x-api-key": KEY})

    return await asyncio.gather(*(one(b) for b in bodies))


@pytest.fixture()
def workers(bundle_dir, tmp_path):
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"stale values of an earlier run")  # must be emptied at start
    env = server_environment(record_url(), KEY, intra_op_threads=1, max_batch_size=4)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    server = ServerProcess(["--bundle", str(bundle_dir), "--workers", "2"], env, tmp_path / "server.log")
    try:
        yield server.start(), WorkerGroup(shared, 2)
    finally:
        server.kill()


def test_two_workers_metrics_are_summed_readiness_waits_for_all_and_sigterm_exits_0(workers, reference,
                                                                                   image_paths):
    server, group = workers
    assert not (group.path / "counter_999999.db").exists()
    pids = sorted({p for p in (_pid_of(e.name) for e in os.scandir(group.path)) if p})
    assert len(pids) == 2 and group.ready_workers() == 2

    from prometheus_client.multiprocess import MultiProcessCollector

    def per_worker() -> list[float]:
        return [sum(s.value for m in MultiProcessCollector.merge([str(group.path / f"counter_{pid}.db")])
                    for s in m.samples if s.name == "aegis_diagnoses_total") for pid in pids]

    # the workers share the listening socket and one may accept a whole round: send rounds (at most 5) until the
    # connections have reached both, so that the sum below is over two workers' counts
    round_of = [png_bytes(p) for p in image_paths] * 3
    bodies: list[bytes] = []
    while len(bodies) < 5 * len(round_of) and not (bodies and all(per_worker())):
        responses = asyncio.run(_post_all(server.url, round_of))
        bodies += round_of
        for body, response in zip(round_of, responses):
            assert response.status_code == 200
            expected = reference.answer(Image.open(io.BytesIO(body)))
            assert (response.json()["diagnosis"], response.json()["decision"]) == (expected["diagnosis"],
                                                                                  expected["decision"])
            assert response.json()["shield_logit"] == pytest.approx(expected["shield_logit"], abs=1e-5)
    # each worker wrote its own counts ...
    counts = per_worker()
    assert sum(counts) == len(bodies) and all(counts), counts
    # ... and whichever worker answers /metrics gives the sum over both, every time
    for _ in range(4):
        text = httpx.get(f"{server.url}/metrics", timeout=10, headers={"x-api-key": KEY}).text
        assert _samples(text, "aegis_requests_total", route="/v1/diagnose", status="200") == len(bodies)
        assert _samples(text, "aegis_ready") == 1 and _samples(text, "aegis_inflight_requests") == 0
        assert "process_resident_memory_bytes" not in text  # one worker's process metrics would mislead

    # a worker dies: not ready until the supervisor's replacement has warmed up; its counts are kept
    os.kill(pids[0], signal.SIGKILL)
    seen, deadline = set(), time.monotonic() + 60
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/readyz", timeout=10).status_code
        seen.add(status)
        if status == 200 and 503 in seen:
            break
        time.sleep(0.05)
    assert seen == {200, 503}, seen
    assert group.ready_workers() == 2 and (group.path / f"ready-{pids[0]}").exists() is False
    more = asyncio.run(_post_all(server.url, bodies[:4]))
    assert [r.status_code for r in more] == [200] * 4
    text = httpx.get(f"{server.url}/metrics", timeout=10, headers={"x-api-key": KEY}).text
    assert _samples(text, "aegis_requests_total", route="/v1/diagnose", status="200") == len(bodies) + 4

    server.signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert not any(e.name.startswith("ready-") for e in os.scandir(group.path))


def test_readiness_counts_live_workers_only_and_drops_what_dead_ones_left(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    group = WorkerGroup(tmp_path, 2)
    for name in (f"ready-{dead.pid}", f"gauge_livesum_{dead.pid}.db", f"counter_{dead.pid}.db"):
        (tmp_path / name).write_bytes(b"")
    group.mark_ready()  # this process
    assert group.ready_workers() == 1 and not group.all_ready
    # the dead worker's mark and live gauges are gone; its counter file stays (its counts still count)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"counter_{dead.pid}.db", f"ready-{os.getpid()}"])
    group = WorkerGroup(tmp_path, 1)
    assert group.all_ready
    group.start_draining()
    assert group.draining and not group.all_ready
    group.mark_stopped()
    assert group.ready_workers() == 0
