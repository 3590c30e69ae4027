"""The diagnose use case, free of HTTP: image bytes -> decode -> prepare + Cushion (worker pool) -> micro-batched
ONNX graph -> Shield decision, with its metrics. `/v1/diagnose` (and any other way an image comes in) calls
`diagnose`; routes only read the request and shape the answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from service.decode import DecodedImage, decode_image
from service.errors import EmptyBody, RequestTimeout
from service.pipeline import DefensePipeline, Verdict
from service.state import ServiceState

ImageReader = Callable[[], Awaitable[tuple[bytes, str | None]]]  # -> (image bytes, declared media type)


@dataclass(frozen=True)
class Diagnosis:
    decoded: DecodedImage  # what was uploaded: format and size
    verdict: Verdict
    batch_size: int  # images in the graph call that answered it
    model_input: np.ndarray  # the row the graph saw: float32 C x H x W in [0, 1], already Cushioned


def _decode_and_prepare(pipeline: DefensePipeline, data: bytes, media_type: str | None, max_pixels: int,
                        max_dicom_pixels: int) -> tuple[DecodedImage, np.ndarray, dict[str, float]]:
    t0 = time.perf_counter()
    decoded = decode_image(data, media_type, max_pixels, max_dicom_pixels)
    decode_seconds = time.perf_counter() - t0
    row, timings = pipeline.preprocess(decoded.image)
    return decoded, row, {"decode": decode_seconds, **timings}


async def diagnose(state: ServiceState, read: ImageReader, *, request_id: str, key_id: str | None = None,
                   source: str = "api", started: float | None = None) -> Diagnosis:
    """Read one image with `read`, run it through the defended pipeline, count it in the metrics and append it to
    the decision record (`request_id`, the caller's `key_id`, `source`: api, stow-rs, c-store...; never PHI).

    `started` (time.perf_counter) is when the request's first byte arrived (the middleware's clock; now when None):
    the request timeout counts from there, through reading, decoding, the batch queue and inference. Reading and
    decoding are bounded stages (service/admission.py: 503 + Retry-After when full) and happen inside
    `batcher.incoming()`, so the batcher knows a row is on its way.
    """
    settings, metrics, pipeline, batcher = state.settings, state.metrics, state.pipeline, state.batcher
    assert pipeline is not None and batcher is not None, "diagnose needs a ready service state"
    started = time.perf_counter() if started is None else started
    budget = settings.request_timeout_seconds

    def remaining() -> float:
        return budget - (time.perf_counter() - started)

    metrics.inflight.inc()
    try:
        with batcher.incoming():
            try:
                async with asyncio.timeout(max(remaining(), 0.0)):
                    with state.stages.upload.enter():
                        data, media_type = await read()
                    if not data:
                        raise EmptyBody("the request carries no image (empty body or empty file)")
                    decoded, row, timings = await state.stages.decode.run_in(
                        state.preprocess_pool, _decode_and_prepare, pipeline, data, media_type, settings.max_pixels,
                        settings.max_dicom_pixels)
            except TimeoutError:
                raise RequestTimeout(f"the request timeout ({budget:.3g} s from the first byte) ran out while reading "
                                     "or decoding the image; retry shortly",
                                     headers={"Retry-After": str(settings.retry_after_seconds)}) from None
        result = await batcher.submit(row, timeout=remaining())
        timings.update(queue=result.queue_seconds, inference=result.inference_seconds)
        timings["total"] = time.perf_counter() - started
        verdict = pipeline.decide(result.logits, result.shield_logits, timings)
    finally:
        metrics.inflight.dec()
    metrics.diagnoses.labels(diagnosis=verdict.diagnosis, decision=verdict.decision).inc()
    metrics.shield_logit.labels(predicted_class=verdict.diagnosis).observe(verdict.shield_logit)
    metrics.observe_stages(timings)
    state.recorder.record(verdict, request_id=request_id, image=data, input_format=decoded.format,
                          width=decoded.width, height=decoded.height, key_id=key_id, source=source)
    return Diagnosis(decoded, verdict, result.batch_size, row)
