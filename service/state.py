"""What the running app holds: settings, metrics, and (after start-up) the bundle, pipeline and batcher."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from models.bundle import Bundle
from service.batching import MicroBatcher
from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline import DefensePipeline
from service.record import DecisionRecorder, DisabledRecorder
from service.workers import WorkerGroup


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    api_keys: dict[bytes, str] = field(default_factory=dict)  # key -> scope (full | coarse)
    auth_limiter: Any = None  # service.security.FailedAuthLimiter
    stages: Any = None  # service.admission.Stages: the bounded upload and decode stages
    metrics_server: Any = None  # the separate /metrics HTTP server (AEGIS_METRICS_PORT), when one runs
    bundle: Bundle | None = None
    pipeline: DefensePipeline | None = None
    batcher: MicroBatcher | None = None
    preprocess_pool: ThreadPoolExecutor | None = None
    inference_executor: ThreadPoolExecutor | None = None  # the one thread of every model call
    recorder: DecisionRecorder | DisabledRecorder | None = None  # the decision record (service/record)
    workers: WorkerGroup | None = None  # the other worker processes of this host (None: one process)
    provider: str = "none"
    ready: bool = False
    draining: bool = False

    def start_draining(self) -> None:
        """Readiness turns false at once; requests already accepted still finish. Only sets a flag (no lock, no
        I/O), so that it is safe inside a signal handler; `aegis_ready` is computed from the flags at scrape time."""
        self.draining = True

    def readiness(self) -> str:
        """ready | not_ready | draining; with workers, ready only while every worker of the group is."""
        if self.draining or (self.workers is not None and self.workers.draining):
            return "draining"
        if not self.ready or (self.workers is not None and not self.workers.all_ready):
            return "not_ready"
        return "ready"

    @property
    def serving(self) -> bool:
        return self.readiness() == "ready"
