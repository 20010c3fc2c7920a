"""Metadata storage: SQLAlchemy models over SQLite (default) or PostgreSQL, migrated by Alembic.

Bytes never live here: object contents, git repositories, uploads and task folders are under
the data directory (see :mod:`anylearn_sdk.server.objects`).
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from anylearn_sdk.protocol import ManifestEntry
from anylearn_sdk.states import UploadState


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware datetime in :data:`datetime.UTC` itself. SQLite returns naive
    datetimes (UTC here); PostgreSQL aware ones in the session's time zone, as a fixed offset
    that ``email.utils.format_datetime(usegmt=True)`` would refuse."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC."""
    return None if value is None else as_utc(value).isoformat()


def new_id(prefix: str) -> str:
    """A random id with a readable kind prefix, for example ``task-3f2a9c1b0d4e5f60``."""
    return f"{prefix}-{secrets.token_hex(8)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("user"))
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    """An API token; only its sha256 is stored, so a leaked database leaks no token. A token
    past ``expires_at`` is refused (None: it never expires). A task's token (``task_id``) is
    scoped to that task."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Set for a task's token: it only fetches that task's code and data, while the task is
    #: QUEUED or RUNNING (see :func:`anylearn_sdk.server.context.current_user`).
    task_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("proj"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Algorithm(Base):
    __tablename__ = "algorithms"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("alg"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ObjectRef(Base):
    """A user owns a stored object: they uploaded its bytes for one of their versions.

    Objects are stored once whoever sent them, but a user is told an object is present only if
    they own it; otherwise ``missing`` would tell anyone whether someone else holds a given
    file (the proof-of-ownership problem of cross-user dedup). A non-owner uploads the bytes,
    which are verified and then only recorded here.
    """

    __tablename__ = "object_refs"
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)


class Resource(Base):
    """A dataset or model version: a manifest of content-addressed files."""

    __tablename__ = "resources"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "dataset" | "model"
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(200))
    checksum: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16))
    #: The canonical manifest (:func:`anylearn_sdk.protocol.canonical_rows`), whose sha256 is
    #: ``checksum``. Loaded only when used: a 20,000-file manifest is megabytes, and most
    #: requests (a state poll, a checksum lookup) never look at it. Nullable in the schema only
    #: because SQLite cannot add a NOT NULL column to a filled table in place (migration 0005).
    canonical: Mapped[bytes] = mapped_column(LargeBinary, nullable=True, deferred=True)
    file_count: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def rows(self) -> list[list]:
        """The manifest's rows, ``[path, size, mode, sha256]`` sorted by path."""
        return json.loads(self.canonical)

    def entries(self) -> list[ManifestEntry]:
        """The manifest's entries, sorted by path."""
        return [ManifestEntry(*row) for row in self.rows()]


class MissingObject(Base):
    """An object a version still lacks: what its registration answered as ``missing``, less
    what its uploads have stored since. A version is READY when it has no row here, so an
    upload's bookkeeping is one batched delete and one count, not a check of every object of
    the manifest (objects are never removed from the store, so a digest off this list stays
    present)."""

    __tablename__ = "resource_missing"
    resource_id: Mapped[str] = mapped_column(ForeignKey("resources.id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Bytes (None in rows from before migration 0005): what a pack member must be, checked
    #: without loading the version's manifest.
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Upload(Base):
    """A tus 1.0 upload; its bytes are in ``uploads/<id>`` until verified and stored.

    ``state``: RECEIVING (bytes still arriving), COMPLETE (a partial upload with all its
    bytes, waiting for the final upload that concatenates it), VERIFYING (on a worker thread),
    STORED (every object verified and in the store) or FAILED (``error`` says why). Finished
    rows stay until ``expires_at`` so a client resuming after a crash sees the upload whole
    rather than starting it again.
    """

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    length: Mapped[int] = mapped_column(BigInteger)
    metadata_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    resource_id: Mapped[str | None] = mapped_column(
        ForeignKey("resources.id"), nullable=True, index=True
    )
    state: Mapped[str] = mapped_column(String(16), default=UploadState.RECEIVING.value)
    #: "partial", "final" or None (tus §Concatenation).
    concat: Mapped[str | None] = mapped_column(String(8), nullable=True)
    #: For a final upload: the ids of its partial uploads, in order.
    parts: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    #: Bytes received by PATCH requests, including any later discarded (a checksum mismatch).
    received_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Mirror(Base):
    """A named runtime environment: the Python interpreter tasks run with."""

    __tablename__ = "mirrors"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mirror"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    python: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QuotaGroup(Base):
    """A capacity pool. ``capacity`` and ``default_request`` map cpu/memory_mb/gpu to amounts.

    A removed group keeps its row (``deleted``), so the records of the tasks that ran in it
    still name it; adding a group of that name again brings the row back.
    """

    __tablename__ = "quota_groups"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("qg"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    capacity: Mapped[dict[str, Any]] = mapped_column(JSON)
    default_request: Mapped[dict[str, Any]] = mapped_column(JSON)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainTask(Base):
    __tablename__ = "train_tasks"
    __table_args__ = (UniqueConstraint("owner_id", "idempotency_key"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("task"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    algorithm_id: Mapped[str] = mapped_column(ForeignKey("algorithms.id"))
    commit: Mapped[str] = mapped_column(String(64))
    entrypoint: Mapped[str] = mapped_column(Text)
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON)
    hyperparams_prefix: Mapped[str] = mapped_column(String(16))
    hyperparams_delimiter: Mapped[str] = mapped_column(String(16))
    mounts: Mapped[dict[str, Any]] = mapped_column(JSON)
    output: Mapped[str] = mapped_column(Text)
    mirror_id: Mapped[str] = mapped_column(ForeignKey("mirrors.id"))
    quota_group_id: Mapped[str] = mapped_column(ForeignKey("quota_groups.id"))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_nodes: Mapped[int] = mapped_column(Integer, default=1)
    nproc_per_node: Mapped[int] = mapped_column(Integer, default=1)
    #: 1 for the first run; one more each time the task is re-queued after its processes were
    #: lost (see :meth:`Scheduler.recover`).
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: The backend (its ``server-id``) that admitted the current attempt and follows it; None
    #: while the task waits for admission. A QUEUED task with a runner is being prepared and
    #: holds its quota, so backends sharing one database count it too.
    runner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    command: Mapped[str | None] = mapped_column(Text, nullable=True)
    pids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: How the current attempt runs: ``environment`` (its key, or None without a
    #: requirements.txt), ``python``, ``gpus`` (device indices) and ``env`` (the variables
    #: every rank gets besides the per-rank ones).
    runtime: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DatabaseURLError(ValueError):
    """A database URL the backend cannot use; the message hides any password."""


def database_url(url: str) -> URL:
    """``url`` parsed, with ``postgresql://`` meaning the psycopg 3 driver.

    Raises:
        DatabaseURLError: not a ``sqlite:///PATH`` or ``postgresql://...`` URL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise DatabaseURLError(f"--database-url {url!r} is not a URL: {err}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        shown = parsed.render_as_string(hide_password=True)
        raise DatabaseURLError(
            f"--database-url {shown}: use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    return parsed


def make_engine(url: str) -> Engine:
    """Create the engine and bring its schema up to date (:func:`upgrade_schema`). SQLite
    gets WAL, a busy timeout and foreign keys; PostgreSQL (driver psycopg 3) a pre-ping.

    Raises:
        DatabaseURLError: the URL names another database (see :func:`database_url`).
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    parsed = database_url(url)
    kwargs: dict[str, Any] = {"json_serializer": lambda obj: json.dumps(obj, ensure_ascii=False)}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=10)
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    upgrade_schema(engine)
    return engine


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Key of the PostgreSQL advisory lock that lets one backend process migrate at a time.
_MIGRATION_LOCK = 0x616E796C  # "anyl"


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema with Alembic's migrations
    (``server/migrations/versions``), in one transaction. A database from before migrations
    (SQLite, ``PRAGMA user_version`` 1 to 5) is adopted with its rows; see revision 0001. On
    PostgreSQL an advisory lock makes backends started at once migrate one after another."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = conn
        alembic_command.upgrade(config, "head")


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
