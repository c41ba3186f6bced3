"""When a job began waiting out an unavailable store, and how often its worker was lost:
neither spends the job's attempts, which count only crashes of the job itself.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("outage_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("worker_losses", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker_losses")
        batch.drop_column("outage_since")
