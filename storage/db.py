"""Database engine for the index: SQLite (embedded, WAL) or PostgreSQL, and Alembic migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseError(Exception):
    """The index database cannot be reached or refused a write."""


def make_engine(url: str) -> Engine:
    """An engine tuned for the index: durable commits, waits instead of failing on SQLite's write lock."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=16)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy issue BEGIN IMMEDIATE itself so writers queue on the lock instead of deadlocking.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so an acknowledged store survives power loss.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        pool_size=16,
        max_overflow=16,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {},
    )


def alembic_config(url: str, migrations: Path = MIGRATIONS_DIR) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", migrations: Path = MIGRATIONS_DIR) -> None:
    """Bring the schema to `revision` (Alembic); safe to run at every start. `migrations` names another package's
    own history (its env.py chooses its version table)."""
    from alembic import command

    command.upgrade(alembic_config(url, migrations), revision)


# pg_advisory_xact_lock(int, int): a key space apart from the single-bigint blob-key locks of storage.ingest.
_MIGRATION_LOCK = (0x76_6E_70_61, 1)  # "vnpa", 1


def serialise_migrations(connection: Connection) -> None:
    """Called by each migration environment inside its transaction: nodes that start together on one new PostgreSQL
    database take turns, so the first creates the schema and the others find it there (without this, all but one
    fail with a duplicate alembic_version table). SQLite has one writer at a time already."""
    if connection.dialect.name == "postgresql":
        a, b = _MIGRATION_LOCK
        connection.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": a, "b": b})


def check(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database unreachable: {exc.__class__.__name__}: {exc}") from exc
