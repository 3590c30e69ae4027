"""Recording decisions off the request path: a bounded queue and one writer thread that inserts them in batches.

`record()` only builds a row and puts it on the queue (no I/O, no wait; callable from any thread: the event loop,
a DICOM association's thread). The writer takes up to `batch_size` rows, or what arrived within `flush_seconds` of
the first, and inserts them in one transaction. A row that cannot be written (queue full, database down after
retries) is counted in `aegis_record_errors_total{reason}` and logged with its request id; the request itself was
already answered. `close()` (graceful shutdown) writes everything still queued before it returns, so a restart loses
nothing. The writer also applies the retention rule (rows older than `retention_days`) every
`retention_check_seconds`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import structlog
from sqlalchemy import Engine, insert

from service.record.schema import decisions
from service.record.store import delete_older_than

log = structlog.get_logger("aegis.record")
WRITE_ATTEMPTS = 3


@dataclass(frozen=True)
class ModelFacts:
    """The served model as the record names it: manifest name and version, sha256 of the ONNX graph."""

    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, bundle) -> ModelFacts:
        m = bundle.manifest
        return cls(m.name, m.version, m.files[m.onnx.file])


@dataclass
class _Flush:
    done: threading.Event


_STOP = object()


class DecisionRecorder:
    enabled = True

    def __init__(self, engine: Engine, model: ModelFacts, metrics=None, *, queue_size: int = 10_000,
                 batch_size: int = 256, flush_seconds: float = 0.2, retention_days: float = 0.0,
                 retention_check_seconds: float = 3600.0):
        self.engine = engine
        self.model = model
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.retention_days = retention_days
        self.retention_check_seconds = retention_check_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="aegis-record-writer", daemon=True)
        self._closed = False

    # --- the request side ------------------------------------------------------------------------------------------
    def record(self, verdict, *, request_id: str, image: bytes, input_format: str, width: int, height: int,
               key_id: str | None, source: str = "api") -> None:
        """Queue one decision. `image`: the bytes as received (only their sha256 is kept); `key_id`: the caller's
        `service.security.key_id`, None when authentication is disabled or not by key; `source`: api, stow-rs,
        c-store... Never pass patient data or file names: the record has no column for them."""
        self.submit({
            "decided_at": datetime.now(timezone.utc),
            "request_id": request_id,
            "source": source,
            "model_name": self.model.name,
            "model_version": self.model.version,
            "model_sha256": self.model.sha256,
            "image_sha256": hashlib.sha256(image).hexdigest(),
            "input_format": input_format,
            "input_width": width,
            "input_height": height,
            "input_bytes": len(image),
            "diagnosis": verdict.diagnosis,
            "probabilities": dict(verdict.probabilities),
            "decision": verdict.decision,
            "shield_logit": float(verdict.shield_logit),
            "threshold": float(verdict.threshold),
            "key_id": key_id,
        })

    def submit(self, row: dict) -> None:
        if self._closed:
            return self._lost("stopped", [row])
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._lost("queue_full", [row])

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> DecisionRecorder:
        self._thread.start()
        return self

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until every row queued before this call is written (or given up); False on timeout."""
        if self._closed or not self._thread.is_alive():
            return self._queue.empty()
        marker = _Flush(threading.Event())
        self._queue.put(marker, timeout=timeout)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking rows, write the queued ones, stop the writer."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("record_close_timeout", seconds=timeout, queued=self._queue.qsize())
        self.engine.dispose()

    # --- the writer thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_retention = time.monotonic()
        while True:
            if self.retention_days > 0 and time.monotonic() >= next_retention:
                self._apply_retention()
                next_retention = time.monotonic() + self.retention_check_seconds
            try:
                item = self._queue.get(timeout=min(self.retention_check_seconds, 60.0))
            except queue.Empty:
                continue
            batch, markers, stop = [], [], False
            deadline = time.monotonic() + self.flush_seconds
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                else:
                    batch.append(item)
                if stop or markers or len(batch) >= self.batch_size:
                    break
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if stop:  # close(): everything queued before _STOP is written too
                batch.extend(self._drain(markers))
            for start in range(0, len(batch), self.batch_size):
                self._write(batch[start:start + self.batch_size])
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _drain(self, markers: list) -> list[dict]:
        rows = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows
            if isinstance(item, _Flush):
                markers.append(item)
            elif item is not _STOP:
                rows.append(item)

    def _write(self, rows: list[dict]) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.engine.begin() as connection:
                    connection.execute(insert(decisions), rows)
            except Exception as error:  # noqa: BLE001 - any database failure: retry, then count the rows lost
                if attempt == WRITE_ATTEMPTS:
                    return self._lost("write_failed", rows, error)
                time.sleep(0.5 * attempt)
            else:
                if self.metrics is not None:
                    self.metrics.records_written.inc(len(rows))
                return

    def _lost(self, reason: str, rows: list[dict], error: Exception | None = None) -> None:
        if self.metrics is not None:
            self.metrics.record_errors.labels(reason=reason).inc(len(rows))
        detail = {}
        if error is not None:  # the DBAPI's own message (a row holds no patient data, but keep the SQL out)
            detail["error"] = f"{type(error).__name__}: {str(getattr(error, 'orig', None) or error).splitlines()[0]}"
        log.error("record_not_written", reason=reason, rows=len(rows),
                  request_ids=[r["request_id"] for r in rows[:20]], **detail)

    def _apply_retention(self) -> None:
        try:
            deleted = delete_older_than(self.engine, self.retention_days)
        except Exception as error:  # noqa: BLE001 - retention is retried at the next check
            log.error("record_retention_failed", error=type(error).__name__)
            return
        if deleted:
            log.info("record_retention", deleted=deleted, older_than_days=self.retention_days)


class DisabledRecorder:
    """AEGIS_RECORD_ENABLED=false (benchmarks only): decisions are not recorded."""

    enabled = False
    engine = None

    def record(self, verdict, **facts) -> None:
        pass

    def submit(self, row: dict) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, timeout: float = 60.0) -> None:
        pass
