"""Tasks name the backend that admitted them (``runner``), so backends sharing one database
count each other's admitted tasks and each follows only its own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("train_tasks") as batch:
        batch.add_column(sa.Column("runner", sa.String(64), nullable=True))
        batch.create_index("ix_train_tasks_runner", ["runner"])


def downgrade() -> None:
    with op.batch_alter_table("train_tasks") as batch:
        batch.drop_index("ix_train_tasks_runner")
        batch.drop_column("runner")
