"""Every Prometheus metric of the service, in one place, on an injectable `CollectorRegistry`.

The monitoring dashboards and alerts are built on exactly these names (namespace `aegis`, base units, bounded labels):

    aegis_requests_total{route, status}             counter: HTTP requests by route template and status code
    aegis_request_duration_seconds{route}           histogram: end-to-end latency by route template
    aegis_request_errors_total{reason}              counter: refused requests, and refused DICOM instances
                                                    (STOW-RS, C-STORE), by reason (payload_too_large,
                                                    too_many_pixels, unsupported_media_type, undecodable,
                                                    unsupported_image, empty_body, missing_file, unauthorized,
                                                    not_ready, overloaded, timeout, inference_failed,
                                                    invalid_request, internal, http, record_disabled,
                                                    malformed_multipart, not_an_image)
    aegis_diagnoses_total{diagnosis, decision}      counter: answered diagnoses; decision = accept | reject
    aegis_shield_logit{predicted_class}             histogram: the predicted class's Shield logit (high = clean);
                                                    its buckets are negative too, so (OpenMetrics) it has _bucket
                                                    and _count series but no _sum
    aegis_stage_duration_seconds{stage}             histogram: stage = decode | prepare | cushion | queue |
                                                    inference | total (per request; inference = its batch's call)
    aegis_batch_size                                histogram: images per ONNX Runtime call
    aegis_queue_depth                               gauge: requests waiting for a batch
    aegis_stage_inflight{stage}                     gauge: requests in each bounded stage: upload (reading the
                                                    body), decode (waiting for or in decode + Cushion), queue
                                                    (waiting for a batch), inference (rows in the running batch)
    aegis_inflight_requests                         gauge: diagnose requests being handled
    aegis_ready                                     gauge: 1 when the bundle is loaded and warmed up, 0 otherwise
    aegis_model_info{name, version, provider, requested_device, bundle_digest, bundle_signature}
                                                    gauge = 1: the served bundle, the ONNX Runtime execution
                                                    provider really in use (e.g. CPUExecutionProvider), the
                                                    bundle's sha256 digest, its signature (verified | unsigned)
    aegis_records_written_total                     counter: decisions written to the decision record
    aegis_record_errors_total{reason}               counter: decisions answered but not recorded: queue_full,
                                                    write_failed (database down after retries), stopped

Process metrics (`process_*`) come from prometheus-client's process collector on the same registry.

One process (the default): the counters live in the process. With workers (`python -m service --workers N`,
service/workers.py) prometheus-client's multiprocess mode keeps every worker's values in the shared folder and any
worker's /metrics answers their aggregate: counters and histograms summed over workers (dead ones included, so that
counts never go back), `aegis_queue_depth` and `aegis_inflight_requests` summed over live workers, `aegis_ready` the
readiness of the whole group (what /readyz answers), `aegis_model_info` their maximum; no `process_*`
metrics there (they would describe one worker only).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from service.runtime import batch_buckets

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
SHIELD_LOGIT_BUCKETS = (-20.0, -10.0, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75,
                        1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)
STAGES = ("decode", "prepare", "cushion", "queue", "inference", "total")
STAGE_GAUGES = ("upload", "decode", "queue", "inference")


class ServiceMetrics:
    """The service's metrics on `registry` (a fresh one when None, so that apps and tests never collide).
    `multiprocess_dir`: the workers' shared folder (PROMETHEUS_MULTIPROC_DIR, set before prometheus-client was
    imported): the exposition is then the aggregate of every worker's values."""

    def __init__(self, registry: CollectorRegistry | None = None, max_batch_size: int = 32,
                 process_collector: bool = True, multiprocess_dir: str | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self._ready_probe: Callable[[], bool] = lambda: False
        r = self.registry
        self.requests = Counter("aegis_requests", "HTTP requests by route template and status code",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram("aegis_request_duration_seconds", "End-to-end request latency",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_errors = Counter("aegis_request_errors", "Refused or failed requests by reason", ["reason"],
                                      registry=r)
        self.diagnoses = Counter("aegis_diagnoses", "Answered diagnoses by predicted class and decision",
                                 ["diagnosis", "decision"], registry=r)
        self.shield_logit = Histogram("aegis_shield_logit", "Shield logit of the predicted class (high = clean)",
                                      ["predicted_class"], buckets=SHIELD_LOGIT_BUCKETS, registry=r)
        self.stage_duration = Histogram("aegis_stage_duration_seconds", "Per-request duration of each stage",
                                        ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("aegis_batch_size", "Images per ONNX Runtime call",
                                    buckets=[float(b) for b in batch_buckets(max_batch_size)], registry=r)
        self.queue_depth = Gauge("aegis_queue_depth", "Requests waiting for a batch", registry=r,
                                 multiprocess_mode="livesum")
        self.stage_inflight = Gauge("aegis_stage_inflight", "Requests in each bounded stage", ["stage"], registry=r,
                                    multiprocess_mode="livesum")
        for stage in STAGE_GAUGES:
            self.stage_inflight.labels(stage=stage)
        self.inflight = Gauge("aegis_inflight_requests", "Diagnose requests being handled", registry=r,
                              multiprocess_mode="livesum")
        self.model_info = Gauge("aegis_model_info", "The served bundle and the execution provider in use",
                                ["name", "version", "provider", "requested_device", "bundle_digest",
                                 "bundle_signature"], registry=r, multiprocess_mode="livemax")
        self.records_written = Counter("aegis_records_written", "Decisions written to the decision record",
                                       registry=r)
        self.record_errors = Counter("aegis_record_errors", "Decisions answered but not recorded, by reason",
                                     ["reason"], registry=r)
        if process_collector and multiprocess_dir is None:
            ProcessCollector(registry=r)
        self._readiness = _Readiness(self)
        r.register(self._readiness)

    def track_ready(self, probe: Callable[[], bool]) -> None:
        """`aegis_ready` follows `probe()`, read at scrape time."""
        self._ready_probe = probe

    def set_model(self, name: str, version: str, provider: str, requested_device: str, bundle_digest: str = "",
                  bundle_signature: str = "unsigned") -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version, provider=provider, requested_device=requested_device,
                               bundle_digest=bundle_digest, bundle_signature=bundle_signature).set(1)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage_duration.labels(stage=stage).observe(seconds)

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        aggregate = CollectorRegistry()
        # readiness first: computing it drops the live gauges of dead workers before the files are summed
        aggregate.register(self._readiness)
        MultiProcessCollector(aggregate, path=self.multiprocess_dir)
        return generate_latest(aggregate)


class _Readiness:
    """`aegis_ready`, read at scrape time from the probe (with workers: the whole group's readiness)."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def collect(self):
        yield GaugeMetricFamily("aegis_ready", "1 when the bundle is loaded and warmed up (every worker's, with "
                                "workers) and the service is not draining", value=float(self.metrics._ready_probe()))
