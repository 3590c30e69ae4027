"""Dynamic micro-batching (the Triton idea) on asyncio: concurrent requests share one ONNX Runtime call.

A single worker task takes the first waiting request, then gathers more until `max_batch_size` rows or
`max_batch_wait_seconds` have passed, stacks them, and runs the batch callable in a thread (the event loop keeps
accepting requests meanwhile). Row i of the outputs goes back to exactly the request that sent row i.

The wait is only paid when it can pay off: when no other request is on its way (being read, decoded or Cushioned,
see `incoming`), the batch leaves at once, so a lone request never waits `max_batch_wait_seconds` for nobody.

Every model call runs on one dedicated thread (`executor`, one worker): ONNX Runtime's CUDA provider keeps its
cuDNN/cuBLAS handles per calling thread, so a pool that hands batches to new threads would create them on the request
path. (On an H100 this alone did not remove the ~0.5 s batches seen under load; see docs/gpu.md.)

The queue is bounded: when `max_queue` requests are waiting, `submit` raises `Overloaded` (503 + Retry-After) at once
instead of letting latency grow without bound. A request that waits longer than its timeout gets `RequestTimeout`;
its row is dropped from any batch not yet started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import structlog

from service.errors import InferenceFailed, NotReady, Overloaded, RequestTimeout
from service.metrics import ServiceMetrics

log = structlog.get_logger("aegis.batching")
BatchFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def inference_executor() -> ThreadPoolExecutor:
    """The one thread that creates the ONNX Runtime session, warms it up and runs every batch."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="aegis-inference")


@dataclass
class _Item:
    row: np.ndarray
    future: asyncio.Future
    enqueued: float


@dataclass(frozen=True)
class BatchResult:
    logits: np.ndarray  # K
    shield_logits: np.ndarray  # K
    queue_seconds: float
    inference_seconds: float
    batch_size: int


class MicroBatcher:
    def __init__(self, run_batch: BatchFn, *, max_batch_size: int, max_wait_seconds: float, max_queue: int,
                 retry_after_seconds: int = 1, metrics: ServiceMetrics | None = None,
                 executor: ThreadPoolExecutor | None = None):
        self.run_batch = run_batch
        self.executor = executor or inference_executor()
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queue = max_queue
        self.retry_after_seconds = retry_after_seconds
        self.metrics = metrics
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._incoming = 0

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap a request's work before `submit` (reading, decoding, Cushion): the batcher then knows that a row is
        on its way and waits for it (up to `max_wait_seconds`) instead of sending a smaller batch."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    # lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._closing = False
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="aegis-micro-batcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new rows, let the queued ones finish (up to `timeout`), then stop the worker."""
        self._closing = True
        if self._queue is not None:
            deadline = time.monotonic() + timeout
            while not self._queue.empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # requests ----------------------------------------------------------------------------------------------------
    async def submit(self, row: np.ndarray, timeout: float) -> BatchResult:
        """Queue one C x H x W row and wait for its outputs."""
        if self._queue is None or self._worker is None or self._closing:
            raise NotReady("the service is not accepting work (starting up or draining)")
        item = _Item(row, asyncio.get_running_loop().create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Overloaded(f"the batch queue is full ({self.max_queue} requests waiting); retry shortly",
                             headers={"Retry-After": str(self.retry_after_seconds)}) from None
        self._set_depth()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            item.future.cancel()  # the worker skips it if its batch has not started
            raise RequestTimeout(f"no answer within the request timeout ({timeout:.3g} s left); retry shortly",
                                 headers={"Retry-After": str(self.retry_after_seconds)}) from None

    # worker ------------------------------------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)
            self.metrics.stage_inflight.labels(stage="queue").set(self.depth)

    def _set_running(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.stage_inflight.labels(stage="inference").set(rows)

    async def _gather(self) -> list[_Item]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_seconds
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._incoming == 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except asyncio.TimeoutError:
                break
        self._set_depth()
        return [item for item in batch if not item.future.done()]

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            started = time.perf_counter()
            self._set_running(len(batch))
            try:
                logits, shield = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.run_batch, np.stack([item.row for item in batch]))
                if len(logits) != len(batch) or len(shield) != len(batch):
                    raise RuntimeError(f"the model returned {len(logits)} rows for a batch of {len(batch)}")
            except Exception as error:  # noqa: BLE001 - every waiting request must get an answer
                log.error("batch_failed", batch_size=len(batch), error=f"{type(error).__name__}: {error}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceFailed(
                            "the model call failed; the request id identifies it in the service logs"))
                continue
            finally:
                self._set_running(0)
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
            for i, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(BatchResult(logits[i], shield[i], started - item.enqueued, elapsed,
                                                       len(batch)))
