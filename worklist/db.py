"""The RIS schema's own Alembic history (version table `worklist_alembic_version`), beside the index's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "worklist_alembic_version"


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the RIS tables to `revision`; safe to run at every start."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
