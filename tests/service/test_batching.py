"""Micro-batching: every request gets exactly its own answer; a full queue answers 503 + Retry-After; timeouts."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image

from service.batching import MicroBatcher
from service.errors import Overloaded, RequestTimeout
from service.main import create_app, default_runner
from service.metrics import ServiceMetrics
from tests.service.conftest import Harness, encode, make_settings, png_bytes, serve


def _echo(batch: np.ndarray):
    """Row i's answer encodes row i's content, so a mix-up cannot go unnoticed."""
    ident = batch.reshape(len(batch), -1)[:, 0].astype(np.float32)
    return np.stack([ident, -ident], 1), np.stack([ident * 2, ident], 1)


def test_every_request_gets_its_own_row_under_heavy_concurrency():
    metrics = ServiceMetrics(max_batch_size=16, process_collector=False)

    async def scenario():
        batcher = MicroBatcher(_echo, max_batch_size=16, max_wait_seconds=0.01, max_queue=1000, metrics=metrics)
        batcher.start()
        rows = [np.full((1, 4, 4), i, np.float32) for i in range(300)]
        results = await asyncio.gather(*(batcher.submit(r, timeout=10) for r in rows))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert result.logits.tolist() == [i, -i] and result.shield_logits.tolist() == [2 * i, i]
    sizes = metrics.registry.get_sample_value("aegis_batch_size_sum")
    count = metrics.registry.get_sample_value("aegis_batch_size_count")
    assert sizes == 300 and count < 300 and max(r.batch_size for r in results) == 16


def test_concurrent_different_images_get_their_single_request_answers(bundle_dir, image_paths):
    images = [png_bytes(p) for p in image_paths]
    gray = [np.asarray(Image.open(p)) for p in image_paths]
    images += [encode(np.ascontiguousarray(g[:, ::-1])) for g in gray] + [encode(np.ascontiguousarray(g.T))
                                                                         for g in gray]
    with serve(bundle_dir, max_batch_size=8, max_batch_wait_seconds=0.05) as harness:
        singles = [harness.post_image(data).json() for data in images]
        assert harness.sample("aegis_batch_size_count") == harness.sample("aegis_batch_size_sum") == len(images)
        calls = [dict(method="POST", url="/v1/diagnose", content=data, headers={"content-type": "image/png"})
                 for data in images * 2]
        together = harness.gather(calls)
        for i, response in enumerate(together):
            single = singles[i % len(images)]
            body = response.json()
            assert response.status_code == 200
            assert body["diagnosis"] == single["diagnosis"] and body["decision"] == single["decision"], i
            assert body["shield_logit"] == pytest.approx(single["shield_logit"], abs=1e-5), i
        batches = harness.sample("aegis_batch_size_count") - len(images)
        assert batches < len(calls)  # some batches carried more than one image
        assert harness.sample("aegis_batch_size_bucket", {"le": "1.0"}) < harness.sample("aegis_batch_size_count")
        assert max(r.json()["timings_seconds"]["queue"] for r in together) < 5


class GatedRunner:
    """The real ONNX runner behind a gate the test opens; counts the rows it runs."""

    def __init__(self):
        self.gate = threading.Event()
        self.blocking = False
        self.entered = threading.Event()

    def factory(self, bundle, settings):
        real = default_runner(bundle, settings)

        def run(batch):
            if self.blocking:
                self.entered.set()
                self.gate.wait(30)
            return real(batch)

        run.provider = real.provider
        return run


def test_full_queue_answers_503_with_retry_after_and_recovers(bundle_dir, image_paths):
    gated = GatedRunner()
    app = create_app(make_settings(bundle_dir, max_batch_size=1, max_queue=2), runner_factory=gated.factory)
    data = png_bytes(image_paths[0])
    with Harness(app) as harness:
        gated.blocking = True

        async def scenario():
            post = lambda: harness.client.post("/v1/diagnose", content=data, headers={"content-type": "image/png"})
            first = asyncio.ensure_future(post())
            while not gated.entered.is_set():  # the worker holds the first request inside the model call
                await asyncio.sleep(0.005)
            queued = [asyncio.ensure_future(post()) for _ in range(2)]
            while harness.state.batcher.depth < 2:
                await asyncio.sleep(0.005)
            overflow = await post()
            assert harness.sample("aegis_queue_depth") == 2
            gated.gate.set()
            return overflow, await asyncio.gather(first, *queued)

        overflow, served = harness.run(scenario())
        assert overflow.status_code == 503
        assert overflow.headers["retry-after"] == "1" and overflow.json()["reason"] == "overloaded"
        assert [r.status_code for r in served] == [200, 200, 200]
        assert harness.sample("aegis_request_errors_total", {"reason": "overloaded"}) == 1
        assert harness.post_image(data).status_code == 200


def test_request_timeout_is_503_and_the_service_recovers(bundle_dir, image_paths):
    gated = GatedRunner()
    app = create_app(make_settings(bundle_dir, request_timeout_seconds=0.3), runner_factory=gated.factory)
    with Harness(app) as harness:
        gated.blocking = True
        started = time.perf_counter()
        response = harness.post_image(png_bytes(image_paths[0]))
        assert response.status_code == 503 and response.json()["reason"] == "timeout"
        assert "retry-after" in response.headers and time.perf_counter() - started < 5
        gated.blocking = False
        gated.gate.set()
        assert harness.post_image(png_bytes(image_paths[0])).status_code == 200


def test_a_failing_model_call_answers_every_request_of_the_batch(bundle_dir, image_paths):
    def factory(bundle, settings):
        real = default_runner(bundle, settings)
        calls = {"n": 0}

        def run(batch):
            calls["n"] += 1
            if calls["n"] == 3:  # after the two warm-up calls
                raise RuntimeError("simulated device failure")
            return real(batch)

        return run

    app = create_app(make_settings(bundle_dir), runner_factory=factory)
    with Harness(app) as harness:
        failed = harness.post_image(png_bytes(image_paths[0]))
        assert failed.status_code == 500 and failed.json()["reason"] == "inference_failed"
        assert "simulated" not in failed.text  # internals stay in the logs
        assert harness.post_image(png_bytes(image_paths[0])).status_code == 200


def test_batcher_refuses_work_after_stop():
    async def scenario():
        batcher = MicroBatcher(_echo, max_batch_size=4, max_wait_seconds=0, max_queue=4)
        batcher.start()
        await batcher.stop()
        with pytest.raises(Exception, match="not accepting"):
            await batcher.submit(np.zeros((1, 2, 2), np.float32), timeout=1)

    asyncio.run(scenario())


def test_overloaded_and_timeout_errors_carry_retry_after():
    async def scenario():
        slow = lambda batch: (time.sleep(0.5), _echo(batch))[1]
        batcher = MicroBatcher(slow, max_batch_size=1, max_wait_seconds=0, max_queue=1, retry_after_seconds=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 1, 1), np.float32), timeout=5))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(np.ones((1, 1, 1), np.float32), timeout=0.1))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as full:
            await batcher.submit(np.ones((1, 1, 1), np.float32), timeout=5)
        with pytest.raises(RequestTimeout) as late:
            await second
        assert (await first).logits.tolist() == [0, 0]
        await batcher.stop()
        return full.value, late.value

    full, late = asyncio.run(scenario())
    assert full.headers == {"Retry-After": "3"} == late.headers


def test_session_creation_warm_up_and_every_batch_run_on_one_inference_thread(bundle_dir, image_paths):
    """ONNX Runtime's CUDA provider keeps cuDNN/cuBLAS handles per calling thread: a batch on a fresh thread pays
    their creation, so every model call must use the same thread."""
    threads: list[int] = []

    def factory(bundle, settings):
        threads.append(threading.get_ident())
        real = default_runner(bundle, settings)

        def run(batch):
            threads.append(threading.get_ident())
            time.sleep(0.002)  # hold the thread a moment, as a real device call would
            return real(batch)

        return run

    app = create_app(make_settings(bundle_dir, max_batch_size=4, max_batch_wait_seconds=0.01),
                     runner_factory=factory)
    with Harness(app) as harness:
        calls = [dict(method="POST", url="/v1/diagnose", content=png_bytes(p), headers={"content-type": "image/png"})
                 for p in image_paths * 4]
        assert all(r.status_code == 200 for r in harness.gather(calls))
    assert len(threads) > 3 and len(set(threads)) == 1
