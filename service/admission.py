"""Bounded, counted stages before the micro-batcher: reading the upload and decoding + Cushion.

Each stage admits at most `limit` requests at once; one more gets `Overloaded` (503 + Retry-After) at once instead of
a place in an unbounded queue, and `aegis_stage_inflight{stage}` shows how full each stage is. The batch queue and
the running batch are the two later stages (service/batching.py sets their gauges). A decode keeps its place until
its thread has really finished, even when its request has timed out: the gauge counts the work, not the waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any, TypeVar

from prometheus_client import Gauge

from service.errors import Overloaded

T = TypeVar("T")


class Stage:
    def __init__(self, name: str, limit: int, gauge: Gauge, retry_after_seconds: int):
        self.name = name
        self.limit = limit
        self.gauge = gauge.labels(stage=name)
        self.retry_after = str(retry_after_seconds)
        self.count = 0

    def acquire(self) -> None:
        if self.count >= self.limit:
            raise Overloaded(f"the {self.name} stage is full ({self.limit} requests); retry shortly",
                             headers={"Retry-After": self.retry_after})
        self.count += 1
        self.gauge.inc()

    def release(self) -> None:
        self.count -= 1
        self.gauge.dec()

    @contextmanager
    def enter(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    async def run_in(self, executor: Executor, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in `executor` inside this stage; the place is given back when the call has finished
        (cancelling the await does not stop a running thread)."""
        self.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = executor.submit(fn, *args)
        except BaseException:
            self.release()
            raise

        def done(_) -> None:
            try:
                loop.call_soon_threadsafe(self.release)
            except RuntimeError:  # the loop is closed (shutdown): nobody reads the count any more
                pass

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)


class Stages:
    def __init__(self, *, max_uploads: int, max_decodes: int, gauge: Gauge, retry_after_seconds: int):
        self.upload = Stage("upload", max_uploads, gauge, retry_after_seconds)
        self.decode = Stage("decode", max_decodes, gauge, retry_after_seconds)
