"""series instance count

Each series keeps its number of instances (series.number_of_series_related_instances), maintained by triggers on
the instance table, so QIDO-RS and C-FIND answer NumberOf…RelatedInstances from a few series rows instead of
counting index entries of every instance of a page of studies (a 100-study page of a 1M-instance archive counted
~10,000 entries per request). Triggers rather than ingest code: every writer (ingest, the replace duplicate policy,
deletes, repairs, SQL by hand) keeps the count right, and PostgreSQL updates each series once per statement.

Note for later migrations: an SQLite batch operation that recreates the instance table drops these triggers;
create them again after it (`_create_triggers`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 08:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMN = "number_of_series_related_instances"

# PostgreSQL: statement-level triggers over the transition tables, one UPDATE per series a statement touched.
_PG_FUNCTIONS = {
    "INSERT": f"""
        UPDATE series SET {COLUMN} = series.{COLUMN} + added.n
        FROM (SELECT series_pk, count(*) AS n FROM new_instances GROUP BY series_pk) AS added
        WHERE series.pk = added.series_pk""",
    "DELETE": f"""
        UPDATE series SET {COLUMN} = series.{COLUMN} - removed.n
        FROM (SELECT series_pk, count(*) AS n FROM old_instances GROUP BY series_pk) AS removed
        WHERE series.pk = removed.series_pk""",
    "UPDATE": f"""
        UPDATE series SET {COLUMN} = series.{COLUMN} + moved.n
        FROM (
            SELECT series_pk, sum(n) AS n FROM (
                SELECT series_pk, count(*) AS n FROM new_instances GROUP BY series_pk
                UNION ALL
                SELECT series_pk, -count(*) AS n FROM old_instances GROUP BY series_pk
            ) AS delta GROUP BY series_pk HAVING sum(n) <> 0
        ) AS moved
        WHERE series.pk = moved.series_pk""",
}
_PG_TRANSITIONS = {
    "INSERT": "NEW TABLE AS new_instances",
    "DELETE": "OLD TABLE AS old_instances",
    "UPDATE": "OLD TABLE AS old_instances NEW TABLE AS new_instances",
}

# SQLite: row-level triggers (its only kind); a single writer at a time, so no lock ordering to care about.
_SQLITE_TRIGGERS = {
    "insert": f"""
        CREATE TRIGGER series_instance_count_insert AFTER INSERT ON instance BEGIN
            UPDATE series SET {COLUMN} = {COLUMN} + 1 WHERE pk = NEW.series_pk;
        END""",
    "delete": f"""
        CREATE TRIGGER series_instance_count_delete AFTER DELETE ON instance BEGIN
            UPDATE series SET {COLUMN} = {COLUMN} - 1 WHERE pk = OLD.series_pk;
        END""",
    "update": f"""
        CREATE TRIGGER series_instance_count_update AFTER UPDATE OF series_pk ON instance
        WHEN OLD.series_pk <> NEW.series_pk BEGIN
            UPDATE series SET {COLUMN} = {COLUMN} - 1 WHERE pk = OLD.series_pk;
            UPDATE series SET {COLUMN} = {COLUMN} + 1 WHERE pk = NEW.series_pk;
        END""",
}


def _create_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for event, body in _PG_FUNCTIONS.items():
            name = f"series_instance_count_{event.lower()}"
            op.execute(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body}; RETURN NULL; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON instance REFERENCING {_PG_TRANSITIONS[event]} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
            )
    else:
        for sql in _SQLITE_TRIGGERS.values():
            op.execute(sql)


def upgrade() -> None:
    # A plain ALTER TABLE, also in SQLite: a batch operation would copy the table, and dropping the old one fails
    # the instance rows' foreign keys.
    op.add_column("series", sa.Column(COLUMN, sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.execute(f"UPDATE series SET {COLUMN} = (SELECT count(*) FROM instance WHERE instance.series_pk = series.pk)")
    _create_triggers()


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for event in ("insert", "delete", "update"):
        name = f"series_instance_count_{event}"
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON instance" if postgresql else ""))
        if postgresql:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.execute(f"ALTER TABLE series DROP COLUMN {COLUMN}")  # SQLite 3.35+, without copying the table
