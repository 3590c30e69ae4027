"""The app factory: `create_app(settings)` -> FastAPI, with a lifespan that loads, checks and warms up the bundle.

Start-up fails fast (bad bundle, ONNX graph that does not match its manifest, CUDA requested but unavailable with
`on_missing_cuda=fail`); readiness stays false until a warm-up inference has run. On shutdown the app turns not-ready
at once, lets queued requests finish, then stops the batcher.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
import structlog
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, start_http_server

from models.bundle import Bundle, load_bundle
from service.admission import Stages
from service.api import (routes_decisions, routes_diagnose, routes_dicomweb, routes_health, routes_model,
                         routes_oip, routes_review)
from service.api.errors import register_error_handlers
from service.batching import BatchFn, MicroBatcher, inference_executor
from service.config import Settings
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.middleware import RequestContextMiddleware
from service.pipeline import DefensePipeline
from service.record import open_recorder
from service.runtime import create_runner
from service.security import FailedAuthLimiter, require_api_key
from service.state import ServiceState
from service.workers import WorkerGroup

log = structlog.get_logger("aegis.service")
RunnerFactory = Callable[[Bundle, Settings], BatchFn]


def default_runner(bundle: Bundle, settings: Settings) -> BatchFn:
    return create_runner(bundle, settings.device, settings.on_missing_cuda, settings.intra_op_threads,
                         settings.max_batch_size, settings.batch_shapes,
                         settings.cudnn_conv_algo_search)


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None,
               runner_factory: RunnerFactory = default_runner, configure_logs: bool = True) -> FastAPI:
    """Build the service. `settings` defaults to the environment (`AEGIS_*`); `registry` to a fresh one;
    `runner_factory(bundle, settings)` returns the batch callable (tests inject slow or failing ones)."""
    settings = settings if settings is not None else Settings()
    if configure_logs:
        configure_logging(settings.log_level)
    state = new_state(settings, registry)
    metrics = state.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await start_state(state, runner_factory)
        try:
            yield
        finally:
            await stop_state(state)

    open_docs = settings.docs_access == "open"
    app = FastAPI(
        title="Medical Aegis",
        summary="A medical image classifier defended by Cushion + Shield: every diagnosis comes with an "
                "accept/reject decision.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if open_docs else None, redoc_url="/redoc" if open_docs else None,
        openapi_url="/openapi.json" if open_docs else None,
    )
    app.state.aegis = state
    app.state.metrics = metrics
    register_error_handlers(app)
    for module in (routes_diagnose, routes_dicomweb, routes_decisions, routes_model, routes_health, routes_oip,
                   routes_review):
        app.include_router(module.router)
    app.mount("/static", routes_review.static_files(), name="static")
    if settings.docs_access == "key":
        _docs_behind_key(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_upload_bytes,
                       max_header_count=settings.max_header_count)
    if settings.auth_disabled:
        log.warning("auth_disabled", detail="API keys are not checked: local use only")
    return app


def worker_app() -> FastAPI:
    """The app factory every worker process calls (uvicorn `factory=True`, `service.workers.APP_FACTORY`): settings
    from the environment that the supervisor set up."""
    return create_app(Settings())


def _docs_behind_key(app: FastAPI) -> None:
    """AEGIS_DOCS_ACCESS=key: the schema and its two viewers answer only with an API key (the viewers then fetch
    /openapi.json without one: read the schema with curl, or serve docs open where that is acceptable)."""
    guarded = dict(include_in_schema=False, dependencies=[Depends(require_api_key)])

    @app.get("/openapi.json", **guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", **guarded)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @app.get("/redoc", **guarded)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - API")


def new_state(settings: Settings, registry: CollectorRegistry | None = None) -> ServiceState:
    """What a service holds before start-up: settings, metrics (on `registry`, a fresh one when None), keys."""
    workers = WorkerGroup.from_environment(settings.workers)
    metrics = ServiceMetrics(registry, max_batch_size=settings.max_batch_size,
                             multiprocess_dir=str(workers.path) if workers is not None else None)
    state = ServiceState(settings=settings, metrics=metrics, workers=workers,
                         api_keys={} if settings.auth_disabled else dict(settings.scoped_api_keys()),
                         auth_limiter=FailedAuthLimiter(settings.auth_failure_limit,
                                                        settings.auth_failure_window_seconds),
                         stages=Stages(max_uploads=settings.max_inflight_uploads,
                                       max_decodes=settings.max_inflight_decodes, gauge=metrics.stage_inflight,
                                       retry_after_seconds=settings.retry_after_seconds))
    metrics.track_ready(lambda: state.serving)
    return state


async def start_state(state: ServiceState, runner_factory: RunnerFactory = default_runner) -> None:
    """Load, check and warm up the bundle, open the decision record, start the batcher (the HTTP app's lifespan and
    the DICOM node both start this way)."""
    settings, metrics = state.settings, state.metrics
    inference = state.inference_executor = inference_executor()
    loop = asyncio.get_running_loop()
    try:
        bundle = await asyncio.to_thread(load_bundle, settings.bundle_dir,
                                         public_key_file=settings.bundle_public_key_file,
                                         signature_file=settings.bundle_signature_file)
        runner = await loop.run_in_executor(inference, runner_factory, bundle, settings)
        state.recorder = await asyncio.to_thread(open_recorder, settings, bundle, metrics)
    except Exception as error:
        log.error("startup_failed", error=f"{type(error).__name__}: {error}")
        raise
    pipeline = DefensePipeline(bundle)
    state.bundle, state.pipeline = bundle, pipeline
    state.provider = getattr(runner, "provider", "custom")
    m = bundle.manifest
    metrics.set_model(m.name, m.version, state.provider, settings.device, bundle.digest, bundle.signature)
    # warm-up outside the batcher (metrics stay clean): every shape the runner will see (batch 1 and the largest
    # batch, or every padding bucket), so that no request pays a first-shape cost
    warmup_sizes = getattr(runner, "warmup_sizes", lambda m: sorted({1, m}))(settings.max_batch_size)
    for size in warmup_sizes:
        batch = np.repeat(pipeline.warmup_input(), size, axis=0)
        logits, shield = await loop.run_in_executor(inference, runner, batch)
        if logits.shape != (size, len(m.classes)) or not (np.isfinite(logits).all() and np.isfinite(shield).all()):
            raise RuntimeError(f"warm-up inference at batch {size} gave outputs of shape {logits.shape} "
                               "or non-finite values")
    state.batcher = MicroBatcher(runner, max_batch_size=settings.max_batch_size,
                                 max_wait_seconds=settings.max_batch_wait_seconds, max_queue=settings.max_queue,
                                 retry_after_seconds=settings.retry_after_seconds, metrics=metrics,
                                 executor=inference)
    state.batcher.start()
    threads = settings.preprocess_threads or os.cpu_count() or 1
    state.preprocess_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aegis-preprocess")
    if settings.metrics_port:
        state.metrics_server, _ = start_http_server(settings.metrics_port, settings.metrics_host,
                                                    registry=metrics.registry)
    state.ready = True
    if state.workers is not None:
        state.workers.mark_ready()
    log.info("service_ready", model=m.name, version=m.version, provider=state.provider, classes=list(m.classes),
             cushion=bundle.cushion.describe(), bundle=str(bundle.root), max_batch_size=settings.max_batch_size,
             auth="disabled" if settings.auth_disabled else "api_key", bundle_digest=bundle.digest,
             bundle_signature=bundle.signature, metrics=f"port {settings.metrics_port}" if settings.metrics_port
             else settings.metrics_access, docs=settings.docs_access, default_scope=settings.default_scope)


async def stop_state(state: ServiceState) -> None:
    state.start_draining()
    state.ready = False
    if state.batcher is not None:
        await state.batcher.stop(timeout=state.settings.request_timeout_seconds)
    if state.recorder is not None:  # every answered request is in the queue by now: write it all
        await asyncio.to_thread(state.recorder.close)
    if state.metrics_server is not None:
        state.metrics_server.shutdown()
        state.metrics_server.server_close()
    if state.preprocess_pool is not None:
        state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
    if state.inference_executor is not None:
        state.inference_executor.shutdown(wait=False, cancel_futures=True)
    if state.workers is not None:
        state.workers.mark_stopped()
    log.info("service_stopped")
