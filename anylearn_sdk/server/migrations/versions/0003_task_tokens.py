"""Tokens may be scoped to one task (``task_id``): a node of a Ray task fetches that task's
code and data with one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("task_id", sa.String(40), nullable=True))
        batch.create_index("ix_tokens_task_id", ["task_id"])


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_index("ix_tokens_task_id")
        batch.drop_column("task_id")
