"""The schema as it stood before migrations were Alembic's (PRAGMA user_version 5).

A database the backend created before then (SQLite, with ``PRAGMA user_version`` 1 to 5 and no
``alembic_version`` table) is adopted as it is: its rows are kept, the columns later versions
added are added, and an upload table older than version 2 (transient rows) is made again. A new
database gets every table.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _users() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def _mirrors() -> None:
    op.create_table(
        "mirrors",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("python", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def _quota_groups() -> None:
    op.create_table(
        "quota_groups",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("capacity", sa.JSON(), nullable=False),
        sa.Column("default_request", sa.JSON(), nullable=False),
        sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def _object_refs() -> None:
    op.create_table(
        "object_refs",
        sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )


def _projects() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("owner_id", "name"),
    )
    op.create_index("ix_projects_owner_id", "projects", ["owner_id"])


def _tokens() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(100), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_tokens_user_id", "tokens", ["user_id"])


def _algorithms() -> None:
    op.create_table(
        "algorithms",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("owner_id", "name"),
    )
    op.create_index("ix_algorithms_owner_id", "algorithms", ["owner_id"])


def _resources() -> None:
    op.create_table(
        "resources",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("file_count", sa.Integer(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_resources_checksum", "resources", ["checksum"])
    op.create_index("ix_resources_owner_id", "resources", ["owner_id"])


def _train_tasks() -> None:
    op.create_table(
        "train_tasks",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("idempotency_key", sa.String(100), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("algorithm_id", sa.String(40), sa.ForeignKey("algorithms.id"), nullable=False),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("entrypoint", sa.Text(), nullable=False),
        sa.Column("hyperparams", sa.JSON(), nullable=False),
        sa.Column("hyperparams_prefix", sa.String(16), nullable=False),
        sa.Column("hyperparams_delimiter", sa.String(16), nullable=False),
        sa.Column("mounts", sa.JSON(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("mirror_id", sa.String(40), sa.ForeignKey("mirrors.id"), nullable=False),
        sa.Column(
            "quota_group_id", sa.String(40), sa.ForeignKey("quota_groups.id"), nullable=False
        ),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("num_nodes", sa.Integer(), nullable=False),
        sa.Column("nproc_per_node", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("command", sa.Text(), nullable=True),
        sa.Column("pids", sa.JSON(), nullable=False),
        sa.Column("runtime", sa.JSON(), server_default="{}", nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("owner_id", "idempotency_key"),
    )
    op.create_index("ix_train_tasks_owner_id", "train_tasks", ["owner_id"])
    op.create_index("ix_train_tasks_state", "train_tasks", ["state"])


def _uploads() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("metadata_json", sa.JSON(), nullable=False),
        sa.Column("resource_id", sa.String(40), sa.ForeignKey("resources.id"), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("concat", sa.String(8), nullable=True),
        sa.Column("parts", sa.JSON(), nullable=True),
        sa.Column("received_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_uploads_expires_at", "uploads", ["expires_at"])
    op.create_index("ix_uploads_owner_id", "uploads", ["owner_id"])
    op.create_index("ix_uploads_resource_id", "uploads", ["resource_id"])


#: Every table, in an order that creates what a foreign key names first.
TABLES: dict[str, Callable[[], None]] = {
    "users": _users,
    "mirrors": _mirrors,
    "quota_groups": _quota_groups,
    "object_refs": _object_refs,
    "projects": _projects,
    "tokens": _tokens,
    "algorithms": _algorithms,
    "resources": _resources,
    "train_tasks": _train_tasks,
    "uploads": _uploads,
}


def _legacy_columns() -> dict[str, list[sa.Column]]:
    """Columns user_version 2 to 5 added to the tables of version 1 (SQLite only: PostgreSQL
    came with Alembic), by table."""
    return {
        "train_tasks": [
            sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
            sa.Column("runtime", sa.JSON(), server_default="{}", nullable=False),
        ],
        "tokens": [
            sa.Column("name", sa.String(100), server_default="", nullable=False),
            sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        ],
        "quota_groups": [
            sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False),
        ],
    }


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    if "users" in existing and bind.dialect.name == "sqlite":
        version = bind.exec_driver_sql("PRAGMA user_version").scalar_one()
        if version < 2 and "uploads" in existing:  # uploads gained states; rows are transient
            op.drop_table("uploads")
            existing.discard("uploads")
        inspector = sa.inspect(bind)
        for table, columns in _legacy_columns().items():
            if table not in existing:
                continue
            have = {c["name"] for c in inspector.get_columns(table)}
            for column in columns:
                if column.name not in have:
                    op.add_column(table, column)
    for table, create in TABLES.items():
        if table not in existing:
            create()


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
