"""N server processes on one host (`python -m service --workers N`, or AEGIS_WORKERS=N): uvicorn's supervisor forks
N workers on one listening socket; each worker builds its own app, ONNX Runtime session and micro-batcher.

Sizing: workers x AEGIS_INTRA_OP_THREADS <= cores (docs/benchmark.md). One process is the default and the right
choice in Kubernetes (scale by replicas there); workers suit one host without an orchestrator.

The workers share one folder, `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's variable; a temporary folder when unset,
emptied at start either way):

- metrics: prometheus-client's multiprocess mode writes every worker's values there and `/metrics`, whichever worker
  answers it, sums the counters and histograms of all of them; the gauges say how they combine
  (`service/metrics.py`). A worker that exits, or that died and is found dead at the next scrape or readiness probe,
  is dropped from the live gauges (`mark_process_dead`).
- readiness: a warmed-up worker writes `ready-<pid>`; `/readyz` answers 200 only while N live workers have one and
  the group is not draining. Readiness is therefore the same whichever worker a probe reaches.
- drain: the first SIGTERM to the supervisor writes `draining` (every worker's /readyz answers 503 at once, traffic
  still flows), and AEGIS_DRAIN_SECONDS later the supervisor sends SIGTERM to every worker: each stops accepting,
  finishes its in-flight requests (up to the graceful timeout) and exits; the supervisor exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

log = structlog.get_logger("aegis.workers")
DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
APP_FACTORY = "service.main:worker_app"  # imported in each worker: ONNX Runtime loads there, not in the supervisor
_READY, _DRAINING = "ready-", "draining"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class WorkerGroup:
    """This worker's view of its group: the shared folder and how many workers there should be."""

    path: Path
    size: int

    @classmethod
    def from_environment(cls, workers: int) -> WorkerGroup | None:
        """The group of a worker process (AEGIS_WORKERS > 1 and the shared folder set), None for one process."""
        path = os.environ.get(DIR_VARIABLE)
        if workers <= 1 or not path:
            return None
        return cls(Path(path), workers)

    def mark_ready(self) -> None:
        (self.path / f"{_READY}{os.getpid()}").touch()

    def mark_stopped(self) -> None:
        (self.path / f"{_READY}{os.getpid()}").unlink(missing_ok=True)
        mark_process_dead(os.getpid(), str(self.path))

    def start_draining(self) -> None:
        (self.path / _DRAINING).touch()

    @property
    def draining(self) -> bool:
        return (self.path / _DRAINING).exists()

    def ready_workers(self) -> int:
        """Live workers that are ready; the marks and live gauges of dead ones are removed on the way."""
        ready = 0
        for entry in os.scandir(self.path):
            pid = _pid_of(entry.name)
            if pid is None:
                continue
            if _alive(pid):
                ready += entry.name.startswith(_READY)
                continue
            if entry.name.startswith(_READY):
                Path(entry.path).unlink(missing_ok=True)
            mark_process_dead(pid, str(self.path))
        return ready

    @property
    def all_ready(self) -> bool:
        return not self.draining and self.ready_workers() >= self.size


def _pid_of(name: str) -> int | None:
    """The pid of a `ready-<pid>` mark or of a live gauge's file `gauge_live<mode>_<pid>.db` (prometheus-client)."""
    if name.startswith(_READY):
        tail = name[len(_READY):]
    elif name.startswith("gauge_live") and name.endswith(".db"):
        tail = name[:-3].rsplit("_", 1)[-1]
    else:
        return None
    return int(tail) if tail.isdigit() else None


def prepare_shared_dir() -> tuple[Path, bool]:
    """The workers' shared folder, emptied (values of an earlier run would be added to this one's); made a temporary
    one and exported when PROMETHEUS_MULTIPROC_DIR is unset. Returns (folder, whether it is ours to delete)."""
    given = os.environ.get(DIR_VARIABLE)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for entry in path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="aegis-workers-"))
    os.environ[DIR_VARIABLE] = str(path)
    return path, True


class Supervisor(Multiprocess):
    """uvicorn's supervisor (restarts a worker that dies, SIGHUP replaces them all) with the service's drain delay."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], group: WorkerGroup,
                 drain_seconds: float):
        super().__init__(config, sockets)
        self.group = group
        self.drain_seconds = drain_seconds
        self._stop_at: float | None = None

    def handle_term(self) -> None:
        self.group.start_draining()
        if self._stop_at is not None or self.drain_seconds <= 0:  # a second SIGTERM skips the rest of the delay
            return super().handle_term()
        self._stop_at = time.monotonic() + self.drain_seconds
        log.info("draining", seconds=self.drain_seconds, workers=self.group.size,
                 detail="/readyz answers 503; still serving")

    def handle_int(self) -> None:
        self.group.start_draining()
        super().handle_int()

    def keep_subprocess_alive(self) -> None:  # called every 0.5 s by the supervisor's loop
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit.set()
        super().keep_subprocess_alive()

    @property
    def startup_failed(self) -> bool:
        return any(p.exitcode == STARTUP_FAILURE for p in self.processes)


def serve_workers(config: uvicorn.Config, settings, environment: dict[str, str]) -> int:
    """Run `settings.workers` workers of `config` (whose app is APP_FACTORY) until SIGTERM/SIGINT; the exit status.

    `environment`: the command line's settings as AEGIS_* variables, so that every worker reads the same settings."""
    os.environ.update(environment)
    cores = len(os.sched_getaffinity(0))
    threads = settings.intra_op_threads or cores  # 0 = ONNX Runtime's default: one thread per core
    if settings.workers * threads > cores:
        log.warning("workers_oversubscribed", workers=settings.workers, intra_op_threads=threads, cores=cores,
                    detail="workers x intra-op threads > cores: set AEGIS_INTRA_OP_THREADS to cores / workers")
    path, temporary = prepare_shared_dir()
    group = WorkerGroup(path, settings.workers)
    if settings.record_enabled and settings.record_migrate:  # once here, not N times at once in the workers
        from service.record.store import create_record_engine, upgrade_schema  # local import: the record's database

        engine = create_record_engine(settings.record_url, settings.record_password_file)
        try:
            upgrade_schema(engine)
        finally:
            engine.dispose()
    supervisor = None
    try:
        sock = config.bind_socket()
        supervisor = Supervisor(config, [sock], group, settings.drain_seconds)
        log.info("workers_starting", workers=settings.workers, shared_dir=str(path),
                 intra_op_threads=settings.intra_op_threads)
        supervisor.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
    return 3 if supervisor is not None and supervisor.startup_failed else 0
