"""Webhook deliveries of their own (one per job event: job.started and the end events), and
the events a job's webhook wants.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("job_id", sa.String(length=32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_event"),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_at"])
    op.drop_index("ix_jobs_webhook_due", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
        batch.drop_column("webhook_next_at")  # deliveries are timed in their own rows now
    op.create_index("ix_jobs_webhook_status", "jobs", ["webhook_status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_webhook_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_events")
        batch.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_webhook_due", "jobs", ["webhook_status", "webhook_next_at"])
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
