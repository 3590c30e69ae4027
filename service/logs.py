"""Structured JSON logs (structlog), one object per line on stdout.

What is logged about a request: request id, route, status, duration, body size, image format and geometry, the
verdict. Never the image bytes, never DICOM attributes (patient name/ID/birth date... are not even read into the log
context), never API keys.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


def configure_logging(level: str = "INFO") -> None:
    """Idempotent: JSON lines to stdout at `level` (structlog's own loggers and the stdlib ones, e.g. uvicorn)."""
    numeric = _LEVELS.get(level.upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(),
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_aegis", False)]:
        root.removeHandler(old)
    handler._aegis = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the service logs each request itself
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at every start
