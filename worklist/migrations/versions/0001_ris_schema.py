"""orders, steps, mpps, reports, outbound, corrections

Revision ID: 0001
Revises:
Create Date: 2026-11-22 06:16:08.397299
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "ris_correction",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("why", sa.Text(), nullable=False),
        sa.Column("changes", sa.Text(), nullable=False),
        sa.Column("originals", sa.Text(), nullable=False),
        sa.Column("instances", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_correction")),
    )
    with op.batch_alter_table("ris_correction", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_correction_study_instance_uid"), ["study_instance_uid"], unique=False)

    op.create_table(
        "ris_order",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("placer_order_number", sa.String(length=64), nullable=True),
        sa.Column("filler_order_number", sa.String(length=64), nullable=False),
        sa.Column("episode_id", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("cccd", sa.String(length=12), nullable=False),
        sa.Column("bhyt", sa.String(length=15), nullable=False),
        sa.Column("patient_name", sa.String(length=324), nullable=False),
        sa.Column("patient_name_key", sa.String(length=324), nullable=False),
        sa.Column("patient_birth_date", sa.String(length=8), nullable=False),
        sa.Column("patient_sex", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=False),
        sa.Column("procedure_code", sa.String(length=64), nullable=False),
        sa.Column("procedure_code_scheme", sa.String(length=64), nullable=False),
        sa.Column("procedure_description", sa.String(length=64), nullable=False),
        sa.Column("referring_physician_name", sa.String(length=324), nullable=False),
        sa.Column("reason_for_study", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_order")),
        sa.UniqueConstraint("accession_number", name=op.f("uq_ris_order_accession_number")),
        sa.UniqueConstraint("placer_order_number", name=op.f("uq_ris_order_placer_order_number")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_ris_order_study_instance_uid")),
    )
    with op.batch_alter_table("ris_order", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_order_bhyt"), ["bhyt"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_order_cccd"), ["cccd"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_order_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_order_episode_id"), ["episode_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_order_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_order_patient_name_key"), ["patient_name_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_order_status"), ["status"], unique=False)

    op.create_table(
        "ris_mpps",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_pk"], ["ris_order.pk"], name=op.f("fk_ris_mpps_order_pk_ris_order"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_mpps")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_ris_mpps_sop_instance_uid")),
    )
    with op.batch_alter_table("ris_mpps", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_mpps_status"), ["status"], unique=False)

    op.create_table(
        "ris_order_event",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("order_pk", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("from_status", sa.String(length=24), nullable=False),
        sa.Column("to_status", sa.String(length=24), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_pk"], ["ris_order.pk"], name=op.f("fk_ris_order_event_order_pk_ris_order"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_order_event")),
    )
    with op.batch_alter_table("ris_order_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_order_event_order_pk"), ["order_pk"], unique=False)

    op.create_table(
        "ris_procedure_step",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("order_pk", sa.Integer(), nullable=False),
        sa.Column("sps_id", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("station_ae_title", sa.String(length=16), nullable=False),
        sa.Column("station_name", sa.String(length=16), nullable=False),
        sa.Column("location", sa.String(length=16), nullable=False),
        sa.Column("start_date", sa.String(length=8), nullable=False),
        sa.Column("start_time", sa.String(length=16), nullable=False),
        sa.Column("performing_physician_name", sa.String(length=324), nullable=False),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_pk"], ["ris_order.pk"], name=op.f("fk_ris_procedure_step_order_pk_ris_order"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_procedure_step")),
        sa.UniqueConstraint("order_pk", "sps_id", name=op.f("uq_ris_procedure_step_order_pk_sps_id")),
    )
    with op.batch_alter_table("ris_procedure_step", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_procedure_step_modality"), ["modality"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_procedure_step_order_pk"), ["order_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_procedure_step_start_date"), ["start_date"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_procedure_step_station_ae_title"), ["station_ae_title"], unique=False)
        batch_op.create_index(batch_op.f("ix_ris_procedure_step_status"), ["status"], unique=False)

    op.create_table(
        "ris_report",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("order_pk", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_pk"], ["ris_order.pk"], name=op.f("fk_ris_report_order_pk_ris_order"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_report")),
    )
    with op.batch_alter_table("ris_report", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_report_study_instance_uid"), ["study_instance_uid"], unique=False)

    op.create_table(
        "ris_report_version",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("report_pk", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("findings", sa.Text(), nullable=False),
        sa.Column("conclusion", sa.Text(), nullable=False),
        sa.Column("recommendation", sa.Text(), nullable=False),
        sa.Column("author_name", sa.String(length=324), nullable=False),
        sa.Column("author_code", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("signer", sa.String(length=512), nullable=False),
        sa.Column("cms_signature", sa.LargeBinary(), nullable=True),
        sa.Column("pdf", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["report_pk"],
            ["ris_report.pk"],
            name=op.f("fk_ris_report_version_report_pk_ris_report"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_report_version")),
        sa.UniqueConstraint("report_pk", "version", name=op.f("uq_ris_report_version_report_pk_version")),
    )
    with op.batch_alter_table("ris_report_version", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_report_version_report_pk"), ["report_pk"], unique=False)

    op.create_table(
        "ris_outbound",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("report_version_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ack", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_version_pk"],
            ["ris_report_version.pk"],
            name=op.f("fk_ris_outbound_report_version_pk_ris_report_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ris_outbound")),
    )
    with op.batch_alter_table("ris_outbound", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_outbound_status"), ["status"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("ris_outbound", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_outbound_status"))

    op.drop_table("ris_outbound")
    with op.batch_alter_table("ris_report_version", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_report_version_report_pk"))

    op.drop_table("ris_report_version")
    with op.batch_alter_table("ris_report", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_report_study_instance_uid"))

    op.drop_table("ris_report")
    with op.batch_alter_table("ris_procedure_step", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_procedure_step_status"))
        batch_op.drop_index(batch_op.f("ix_ris_procedure_step_station_ae_title"))
        batch_op.drop_index(batch_op.f("ix_ris_procedure_step_start_date"))
        batch_op.drop_index(batch_op.f("ix_ris_procedure_step_order_pk"))
        batch_op.drop_index(batch_op.f("ix_ris_procedure_step_modality"))

    op.drop_table("ris_procedure_step")
    with op.batch_alter_table("ris_order_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_order_event_order_pk"))

    op.drop_table("ris_order_event")
    with op.batch_alter_table("ris_mpps", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_mpps_status"))

    op.drop_table("ris_mpps")
    with op.batch_alter_table("ris_order", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_order_status"))
        batch_op.drop_index(batch_op.f("ix_ris_order_patient_name_key"))
        batch_op.drop_index(batch_op.f("ix_ris_order_patient_id"))
        batch_op.drop_index(batch_op.f("ix_ris_order_episode_id"))
        batch_op.drop_index(batch_op.f("ix_ris_order_created_at"))
        batch_op.drop_index(batch_op.f("ix_ris_order_cccd"))
        batch_op.drop_index(batch_op.f("ix_ris_order_bhyt"))

    op.drop_table("ris_order")
    with op.batch_alter_table("ris_correction", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_correction_study_instance_uid"))

    op.drop_table("ris_correction")
