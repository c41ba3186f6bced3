"""A generation's content and style strengths (a B4M adapter's two halves scaled apart).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("content_scale", sa.Float(), nullable=False, server_default="1.0"))
        batch.add_column(sa.Column("style_scale", sa.Float(), nullable=False, server_default="1.0"))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("style_scale")
        batch.drop_column("content_scale")
