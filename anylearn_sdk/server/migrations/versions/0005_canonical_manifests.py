"""A version keeps its manifest as the canonical bytes its checksum is the sha256 of
(``resources.canonical``), instead of a JSON list of objects: a delta against it is applied to
rows and hashed with one ``json.dumps``, and the bytes stored are the bytes checked. The
objects a version lacks carry their size (``resource_missing.size``), so a pack of them is
checked without loading the manifest.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
import sqlite3

import sqlalchemy as sa
from alembic import op

from anylearn_sdk.protocol import canonical_rows

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
FIELDS = ("path", "size", "mode", "sha256")


def upgrade() -> None:
    op.add_column("resource_missing", sa.Column("size", sa.BigInteger(), nullable=True))
    op.add_column("resources", sa.Column("canonical", sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    resources = sa.table(
        "resources", sa.column("id", sa.String), sa.column("canonical", sa.LargeBinary)
    )
    ids = list(conn.scalars(sa.text("SELECT id FROM resources")))
    for resource_id in ids:
        stored = conn.scalar(
            sa.text("SELECT manifest FROM resources WHERE id = :id"), {"id": resource_id}
        )
        entries = json.loads(stored) if isinstance(stored, str | bytes) else stored or []
        rows = sorted([e[f] for f in FIELDS] for e in entries)
        conn.execute(
            resources.update()
            .where(resources.c.id == resource_id)
            .values(canonical=canonical_rows(rows))
        )
    if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 35):
        op.execute("ALTER TABLE resources DROP COLUMN manifest")  # in place, keys kept
    else:
        with op.batch_alter_table("resources") as batch:
            batch.drop_column("manifest")


def downgrade() -> None:
    op.add_column("resources", sa.Column("manifest", sa.JSON(), nullable=True))
    conn = op.get_bind()
    resources = sa.table("resources", sa.column("id", sa.String), sa.column("manifest", sa.JSON))
    ids = list(conn.scalars(sa.text("SELECT id FROM resources")))
    for resource_id in ids:
        canonical = conn.scalar(
            sa.text("SELECT canonical FROM resources WHERE id = :id"), {"id": resource_id}
        )
        rows = json.loads(canonical) if canonical else []
        conn.execute(
            resources.update()
            .where(resources.c.id == resource_id)
            .values(manifest=[dict(zip(FIELDS, row, strict=True)) for row in rows])
        )
    op.drop_column("resources", "canonical")
    op.drop_column("resource_missing", "size")
