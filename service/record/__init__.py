"""The decision record: every decision the service makes, appended to a database, free of patient data.

    recorder = open_recorder(settings, bundle, metrics)      # at start-up: engine, migrations, writer thread
    recorder.record(verdict, request_id=..., image=data, input_format="png", width=w, height=h, key_id=k)
    recorder.close()                                          # at shutdown: writes what is queued

`schema` (the table), `store` (engine, migrations, queries), `writer` (the batched writer off the request path).
"""

from __future__ import annotations

import structlog

from service.record.store import (DecisionFilter, RecordError, check_schema, create_record_engine,
                                  upgrade_schema)
from service.record.writer import DecisionRecorder, DisabledRecorder, ModelFacts

log = structlog.get_logger("aegis.record")

__all__ = ["DecisionFilter", "DecisionRecorder", "DisabledRecorder", "ModelFacts", "RecordError", "open_recorder"]


def open_recorder(settings, bundle, metrics=None) -> DecisionRecorder | DisabledRecorder:
    """The recorder the settings ask for, its schema upgraded (or checked) and its writer started."""
    if not settings.record_enabled:
        log.warning("record_disabled", detail="decisions are not recorded (AEGIS_RECORD_ENABLED=false)")
        return DisabledRecorder()
    engine = create_record_engine(settings.record_url, settings.record_password_file)
    try:
        if settings.record_migrate:
            upgrade_schema(engine)
        else:
            check_schema(engine)
    except Exception:
        engine.dispose()
        raise
    log.info("record_open", database=engine.url.render_as_string(hide_password=True),
             retention_days=settings.record_retention_days or None)
    return DecisionRecorder(engine, ModelFacts.of(bundle), metrics, queue_size=settings.record_queue_size,
                            batch_size=settings.record_batch_size, flush_seconds=settings.record_flush_seconds,
                            retention_days=settings.record_retention_days,
                            retention_check_seconds=settings.record_retention_check_seconds).start()
