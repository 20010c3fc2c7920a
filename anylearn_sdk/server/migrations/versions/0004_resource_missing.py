"""Versions list the objects they still lack (``resource_missing``), so storing a pack costs
one batched delete and one count instead of a check of every object of the manifest.

A version still uploading when the backend is upgraded gets every digest of its manifest
listed; its next registration (the client's resume) keeps only those its owner lacks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "resource_missing",
        sa.Column("resource_id", sa.String(40), sa.ForeignKey("resources.id"), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )
    conn = op.get_bind()
    uploading = conn.execute(
        sa.text("SELECT id, manifest FROM resources WHERE state IN ('CREATED', 'UPLOADING')")
    )
    for resource_id, manifest in uploading:
        entries = json.loads(manifest) if isinstance(manifest, str) else manifest
        digests = sorted({e["sha256"] for e in entries or []})
        if digests:
            op.bulk_insert(table, [{"resource_id": resource_id, "sha256": d} for d in digests])


def downgrade() -> None:
    op.drop_table("resource_missing")
