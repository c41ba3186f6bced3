"""Webhooks on job end: the job's webhook URL and delivery state; each tenant's signing secret.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_url", sa.String(length=2000), nullable=True))
        batch.add_column(sa.Column("webhook_status", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("webhook_error", sa.Text(), nullable=True))
    op.create_index("ix_jobs_webhook_due", "jobs", ["webhook_status", "webhook_next_at"])
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("webhook_secret")
    op.drop_index("ix_jobs_webhook_due", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_error")
        batch.drop_column("webhook_next_at")
        batch.drop_column("webhook_attempts")
        batch.drop_column("webhook_status")
        batch.drop_column("webhook_url")
