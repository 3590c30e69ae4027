"""Structured JSON logs (structlog), one object per line on stdout.

What is logged about a request: request id, route, status, duration, body size, image format and geometry, the
verdict. Never the image bytes, never DICOM attributes (patient name/ID/birth date... are not even read into the log
context), never API keys.

Library warnings (`warnings.warn`) become `library_warning` lines of the same JSON stream instead of free text on
stderr; pydicom's warnings and log records quote element values ("Invalid value for VR CS: '...'"), which can be
patient data, so their text is withheld and only the category is kept.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import structlog

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
WITHHELD = frozenset({"pydicom"})  # libraries whose messages may quote DICOM element values
warnings_log = structlog.get_logger("aegis.warnings")


def _source(filename: str) -> str:
    """The top-level package a warning comes from (its folder under site-packages), else the file's stem."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return Path(parts[parts.index(marker) + 1]).stem
    return Path(filename).stem


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    source = _source(str(filename))
    text = None if source in WITHHELD else str(message)[:500]
    warnings_log.warning("library_warning", category=category.__name__, source=source, message=text)


class _WithholdMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = f"{record.name} message withheld (may quote DICOM values)", ()
        return True


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
    warnings.showwarning = _log_warning
    for name in WITHHELD:
        library = logging.getLogger(name)
        if not any(isinstance(f, _WithholdMessage) for f in library.filters):
            library.addFilter(_WithholdMessage())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at every start
