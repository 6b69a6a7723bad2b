"""The RIS schema's own Alembic history (version table `worklist_alembic_version`), beside the index's."""

from __future__ import annotations

from pathlib import Path

from storage import db

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "worklist_alembic_version"


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the RIS tables to `revision`; safe to run at every start."""
    db.upgrade(url, revision, MIGRATIONS_DIR)
