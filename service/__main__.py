"""`python -m service`: serve the embedded default bundle (or `--bundle DIR`) with uvicorn.

One process per container by default, scaled by replicas; `--workers N` (AEGIS_WORKERS) runs N processes on one port
for a host without an orchestrator, metrics and readiness aggregated over them (service/workers.py). On SIGTERM, /readyz answers 503 at once,
traffic keeps being served for AEGIS_DRAIN_SECONDS (so the load balancer can take the pod out), then uvicorn stops
accepting, waits for in-flight requests and exits 0 (the Kubernetes pattern; set AEGIS_DRAIN_SECONDS to a few
seconds there, the default 0 suits local use). A second SIGTERM, or Ctrl-C, skips what is left of the drain delay.

HTTP limits before any authentication (head size and time, header count, connections; `http_limits`, service/http.py,
docs/security.md "HTTP limits") come from settings.

    AEGIS_AUTH_DISABLED=true python -m service                       # local, default bundle, 127.0.0.1:8000
    AEGIS_AUTH_DISABLED=true python -m service --workers 2           # two processes on one port (service/workers.py)
    AEGIS_API_KEYS_FILE=/run/secrets/keys python -m service --host 0.0.0.0 --port 8000 --bundle /models/cxr
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog
import uvicorn
from pydantic import ValidationError

from service.config import Settings
from service.http import guarded_protocol

log = structlog.get_logger("aegis.service")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM marks the app draining and only stops the server `drain_seconds` later."""

    def __init__(self, config: uvicorn.Config, state, drain_seconds: float):
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        # runs inside a signal handler: set flags and hand the rest to the event loop (no locks, no I/O here)
        self.state.start_draining()
        if self._draining or sig != signal.SIGTERM or self.drain_seconds <= 0:
            return self._stop(sig, frame)
        self._draining = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._stop(sig, frame)
        loop.call_soon_threadsafe(self._drain_later, loop, sig)

    def _drain_later(self, loop: asyncio.AbstractEventLoop, sig: int) -> None:
        log.info("draining", seconds=self.drain_seconds, detail="/readyz answers 503; still serving")
        loop.call_later(self.drain_seconds, self._stop, sig, None)

    def _stop(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the captured signal after a graceful shutdown (the process would then die "by SIGTERM");
        # a completed drain is a clean exit: status 0
        if sig == signal.SIGTERM and hasattr(self, "_captured_signals"):
            self._captured_signals.clear()


def http_limits(settings: Settings) -> dict:
    """uvicorn options that bound a client before any authentication (docs/security.md, "HTTP limits"): both
    protocols are guarded (head size and time, service/http.py)."""
    limits = dict(limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_seconds,
                  http=guarded_protocol(settings.http, settings.header_timeout_seconds, settings.max_header_bytes))
    if settings.http == "h11":
        limits["h11_max_incomplete_event_size"] = settings.max_header_bytes
    return limits


def checked_settings(overrides: dict) -> Settings | None:
    """The settings (environment + `overrides`) and a loadable bundle, or None after one clear line per problem on
    stderr: fail before binding a port."""
    try:
        settings = Settings(**overrides)
    except ValidationError as error:  # never echo the input: it may hold API keys
        for problem in error.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in problem["loc"])
            print(f"invalid settings: {'AEGIS_' + where.upper() + ': ' if where else ''}{problem['msg']}",
                  file=sys.stderr)
        return None

    from models.bundle import BundleError, load_bundle  # local import: settings errors first, before heavy imports

    try:
        load_bundle(settings.bundle_dir, public_key_file=settings.bundle_public_key_file,
                    signature_file=settings.bundle_signature_file)
    except BundleError as error:
        print(f"cannot serve: {error}", file=sys.stderr)
        return None
    return settings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--bundle", default=None, help="bundle folder (default: AEGIS_BUNDLE_DIR, else the embedded "
                                                       "default bundle models/default)")
    parser.add_argument("--auth-disabled", action="store_true",
                        help="serve without API keys (local use only; same as AEGIS_AUTH_DISABLED=true)")
    parser.add_argument("--log-level", default=None, help="DEBUG | INFO | WARNING | ERROR")
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes, each with its own ONNX Runtime session (default: AEGIS_WORKERS, "
                             "else 1); keep workers x AEGIS_INTRA_OP_THREADS <= cores")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    overrides = {}
    if args.bundle is not None:
        overrides["bundle_dir"] = args.bundle
    if args.auth_disabled:
        overrides["auth_disabled"] = True
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    if args.workers is not None:
        overrides["workers"] = args.workers
    settings = checked_settings(overrides)
    if settings is None:
        return 2

    workers = settings.workers > 1
    if workers:  # every worker process builds its own app from the environment (service/workers.py)
        from service.logs import configure_logging  # local import: the supervisor's own log lines
        from service.workers import APP_FACTORY, serve_workers  # local import: only a supervisor of workers needs it

        app = APP_FACTORY
    else:
        from service.main import create_app  # local import: imports ONNX Runtime, only once the bundle is known good

        app = create_app(settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, workers=settings.workers, factory=workers,
                            lifespan="on", log_config=None,
                            access_log=False, server_header=False,
                            timeout_graceful_shutdown=int(settings.request_timeout_seconds) + 5,
                            **http_limits(settings))
    if workers:
        configure_logging(settings.log_level)
        return serve_workers(config, settings, {f"AEGIS_{key.upper()}": str(value).lower() if isinstance(value, bool)
                                                else str(value) for key, value in overrides.items()})
    server = DrainingServer(config, app.state.aegis, settings.drain_seconds)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 130
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
