"""Job leases for crash recovery: claim token, lease expiry, last enqueue time and the
step of the last checkpoint.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("checkpoint_step", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_lease", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueued_at")
        batch.drop_column("lease_expires_at")
        batch.drop_column("claim_token")
        batch.drop_column("checkpoint_step")
