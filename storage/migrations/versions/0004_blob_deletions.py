"""blob deletions

Keys of blobs deleted because no index row referenced them, so that a commit of the same bytes (content-addressed
key) on another node can tell that its blob may have been deleted after it wrote it (see models.BlobDeletion).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_deletion",
        sa.Column("blob_key", sa.String(length=255), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("blob_key", name=op.f("pk_blob_deletion")),
    )
    op.create_index(op.f("ix_blob_deletion_deleted_at"), "blob_deletion", ["deleted_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_blob_deletion_deleted_at"), table_name="blob_deletion")
    op.drop_table("blob_deletion")
