"""The decision record's one table, `decisions`: what was decided, by which model, on which bytes; never who the
patient is.

A row holds the request id, the time, the model (name, version, sha256 of its ONNX graph), the sha256 of the image
bytes as received, the input's format and size, the verdict (diagnosis, probabilities, decision, Shield logit,
threshold), where it came from (`source`: the API, or a DICOM path) and the caller's key id (a non-secret digest of
the API key, `service.security.key_id`). No column can hold a DICOM attribute, a file name or a key.

The Alembic migrations in `service/record/migrations` create exactly this table (a test compares them).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Column, DateTime, Float, Index, Integer, MetaData, String, Table
from sqlalchemy.types import TypeDecorator

metadata = MetaData(naming_convention={"ix": "ix_%(table_name)s_%(column_0_name)s", "pk": "pk_%(table_name)s"})


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend: PostgreSQL keeps `timestamptz`; SQLite (no time zones) stores
    the UTC wall time and gets UTC attached back, so that comparisons and filters mean the same on both."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the decision record stores timezone-aware datetimes only")
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


decisions = Table(
    "decisions", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("decided_at", UtcDateTime(), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("source", String(16), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("input_format", String(8), nullable=False),
    Column("input_width", Integer, nullable=False),
    Column("input_height", Integer, nullable=False),
    Column("input_bytes", BigInteger, nullable=False),
    Column("diagnosis", String(64), nullable=False),
    Column("probabilities", JSON, nullable=False),
    Column("decision", String(8), nullable=False),
    Column("shield_logit", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("key_id", String(32), nullable=True),
    Index(None, "decided_at"),
    Index(None, "request_id"),
)

COLUMNS = tuple(c.name for c in decisions.columns)
