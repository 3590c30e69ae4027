"""The decision record's database: engine (SQLite file or PostgreSQL by URL), schema migrations, and the read queries
of `GET /v1/decisions` and `python -m service.cli export-decisions`.

    sqlite:///aegis-records.sqlite                       the default: a file next to where the service runs
    postgresql+psycopg://aegis@db.example:5432/aegis     PostgreSQL (psycopg 3); the password may come from a file

SQLite runs in WAL mode, so that readers (the API, an export) never block the writer; it suits one service process.
Several replicas share one PostgreSQL database. The schema is Alembic's (`service/record/migrations`): the service
upgrades it at start-up (AEGIS_RECORD_MIGRATE=true, the default) or refuses to start on an old schema, in which
case `python -m service.cli migrate` upgrades it. Concurrent upgrades from replicas starting together are serialised
by a PostgreSQL advisory lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, create_engine, delete, event, func, select, text
from sqlalchemy.engine import make_url

from service.record.schema import decisions

MIGRATIONS = "service.record:migrations"
_UPGRADE_LOCK = 0x41E615  # PostgreSQL advisory lock key of schema upgrades


class RecordError(RuntimeError):
    """The decision record cannot be opened or is not at the schema this code writes."""


def database_url(url: str, password_file: Path | None = None):
    """The SQLAlchemy URL, with the password read from `password_file` (a mounted secret) when given."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # the one PostgreSQL driver this project installs
    if password_file is not None:
        parsed = parsed.set(password=Path(password_file).read_text(encoding="utf-8").strip())
    return parsed


def create_record_engine(url: str, password_file: Path | None = None) -> Engine:
    parsed = database_url(url, password_file)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise RecordError("an in-memory SQLite database would lose the record: give a file, "
                              "e.g. sqlite:///aegis-records.sqlite")
        engine = create_engine(parsed, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    raise RecordError(f"unsupported decision record database {parsed.get_backend_name()!r}: use sqlite:///FILE "
                      "or postgresql+psycopg://USER@HOST/DB")


def _alembic_config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the latest migration (idempotent)."""
    from alembic import command

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        command.upgrade(_alembic_config(connection), "head")


def check_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise RecordError(f"the decision record's schema is at revision {current} but this service writes {head}: "
                          "run `python -m service.cli migrate` (or start with AEGIS_RECORD_MIGRATE=true)")


def delete_older_than(engine: Engine, days: float, now: datetime | None = None) -> int:
    """The retention rule: delete the decisions older than `days`; answers how many rows went."""
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    with engine.begin() as connection:
        return connection.execute(delete(decisions).where(decisions.c.decided_at < cutoff)).rowcount


@dataclass(frozen=True)
class DecisionFilter:
    """What auditors select by: a time window [since, until), decision, predicted class, request id."""

    since: datetime | None = None
    until: datetime | None = None
    decision: str | None = None
    diagnosis: str | None = None
    request_id: str | None = None

    def where(self, query):
        c = decisions.c
        if self.since is not None:
            query = query.where(c.decided_at >= _utc(self.since))
        if self.until is not None:
            query = query.where(c.decided_at < _utc(self.until))
        if self.decision is not None:
            query = query.where(c.decision == self.decision)
        if self.diagnosis is not None:
            query = query.where(c.diagnosis == self.diagnosis)
        if self.request_id is not None:
            query = query.where(c.request_id == self.request_id)
        return query


def _utc(value: datetime) -> datetime:
    """Naive datetimes in a query mean UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def query_decisions(engine: Engine, where: DecisionFilter, *, after_id: int = 0, limit: int = 100) -> list[dict]:
    """One page, in record order (id): the rows with id > `after_id`, at most `limit`."""
    query = where.where(select(decisions)).where(decisions.c.id > after_id).order_by(decisions.c.id).limit(limit)
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def iter_decisions(engine: Engine, where: DecisionFilter, page: int = 1000) -> Iterator[dict]:
    """Every matching row in record order, read page by page (keyset pagination: constant memory)."""
    after = 0
    while True:
        rows = query_decisions(engine, where, after_id=after, limit=page)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1]["id"]


def count_decisions(engine: Engine, where: DecisionFilter = DecisionFilter()) -> int:
    with engine.connect() as connection:
        return connection.execute(where.where(select(func.count()).select_from(decisions))).scalar_one()
