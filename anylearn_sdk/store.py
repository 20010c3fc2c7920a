"""The local store: one SQLite database (``ANYLEARN_HOME/anylearn.db``) through sqlite-utils.

Tables (created by the versioned migrations below, recorded in ``_sqlite_migrations``):

* ``hash_cache``: per-file sha256 keyed by absolute path and validated by (size, mtime_ns,
  inode), as dvc-data's state does; an entry is trusted only if the file's mtime is older than
  the moment the entry was written (git's "racy" rule, so a file changed in the same clock
  tick as its hashing is hashed again).
* ``remote_resources``: (server, kind, checksum) → remote id of a dataset or model version.
* ``train_tasks``: every task created, with its server, state and the profile that made it
  (host URL and username).
* ``upload_units``: the journal of uploads in progress: for each unit of an upload plan (a
  pack, an object, a part of an object, the final concatenation) its tus URL, written right
  after the server created it and before any byte is sent, so a new process resumes each unit
  from the server's offset.
* ``folder_manifests``: per folder (or archive), a fingerprint of every file's stat key and the
  manifest checksum it gave, so an unchanged folder is recognised from one walk without
  loading a row per file; and that walk with each file's digest, so a changed folder is
  rebuilt from the files whose stat key changed.
* ``pending_calls``: each ``quick_train`` call between the moment its code and inputs were
  pinned (a commit, checksums) and the creation of its task: its arguments and that identity,
  so :func:`~anylearn_sdk.resume_unfinished_local_train_tasks` finishes a call whose process
  died, and refuses one whose code or inputs changed since.

Every row that names a remote id also names the server it belongs to, by the ``server_id``
the server reports on ``/health`` (stable across restarts and port changes). Every write is in a
transaction taken with ``BEGIN IMMEDIATE`` (:meth:`LocalStore._write`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

from anylearn_sdk.states import TaskState

DB_FILE = "anylearn.db"
#: Bump when the meaning of a cached hash changes; older rows are then ignored.
HASH_CACHE_SCHEMA = 1
#: sqlite's default limit on bound parameters is 999; batches stay below it.
SQL_BATCH = 900

migrations = Migrations("anylearn_sdk")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["hash_cache"].create(
        {
            "path": str,
            "size": int,
            "mtime_ns": int,
            "inode": int,
            "sha256": str,
            "cached_at_ns": int,
            "schema": int,
        },
        pk="path",
    )
    db["remote_resources"].create(
        {
            "server": str,
            "kind": str,
            "checksum": str,
            "resource_id": str,
            "name": str,
            "created_at": float,
        },
        pk=("server", "kind", "checksum"),
    )
    db["train_tasks"].create(
        {
            "server": str,
            "task_id": str,
            "host": str,
            "username": str,
            "name": str,
            "state": str,
            "algorithm_id": str,
            "commit": str,
            "created_at": float,
            "updated_at": float,
        },
        pk=("server", "task_id"),
    )
    db["upload_sessions"].create(
        {
            "server": str,
            "resource_id": str,
            "pack_key": str,
            "upload_url": str,
            "length": int,
            "created_at": float,
        },
        pk=("server", "resource_id"),
    )


@migrations()
def m002_upload_units_and_folder_manifests(db: sqlite_utils.Database) -> None:
    db["upload_sessions"].drop(ignore=True)
    db["upload_units"].create(
        {
            "server": str,
            "resource_id": str,
            "unit_key": str,
            "upload_url": str,
            "length": int,
            "created_at": float,
        },
        pk=("server", "resource_id", "unit_key"),
    )
    db["folder_manifests"].create(
        {
            "root": str,
            "fingerprint": str,
            "checksum": str,
            "file_count": int,
            "total_bytes": int,
            "max_mtime_ns": int,
            "cached_at_ns": int,
        },
        pk="root",
    )


@migrations()
def m003_folder_manifest_entries(db: sqlite_utils.Database) -> None:
    db["folder_manifests"].add_column("entries_z", bytes)


@migrations()
def m004_pending_calls(db: sqlite_utils.Database) -> None:
    db["pending_calls"].create(
        {
            "server": str,
            "call_id": str,
            "host": str,
            "username": str,
            "arguments": str,
            "identity": str,
            "pid": int,
            "created_at": float,
        },
        pk=("server", "call_id"),
    )


@migrations()
def m005_folder_walks(db: sqlite_utils.Database) -> None:
    db["folder_manifests"].add_column("walk_z", bytes)


@dataclass(frozen=True)
class FolderManifest:
    fingerprint: str
    checksum: str
    file_count: int
    total_bytes: int
    max_mtime_ns: int
    cached_at_ns: int


@dataclass(frozen=True)
class CachedHash:
    size: int
    mtime_ns: int
    inode: int
    sha256: str
    cached_at_ns: int


class LocalStore:
    """Open (creating and migrating if needed) the store under ``home``.

    Safe to share across threads: each thread gets its own SQLite connection.
    """

    def __init__(self, home: Path):
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = home / DB_FILE
        self._local = threading.local()
        self._writer: ThreadPoolExecutor | None = None
        self._writer_lock = threading.Lock()
        self._last_write: Future | None = None
        with self.db.ensure_autocommit_on():
            self.db.execute("PRAGMA journal_mode = WAL")
        migrations.apply(self.db)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite_utils.Database(self.path)
            db.execute("PRAGMA busy_timeout = 30000")
            # WAL with NORMAL: a commit is safe from a crash of the process (what the upload
            # journal must survive) without an fsync each; a power loss may drop the last few,
            # which costs a rerun some hashing or an upload created again.
            db.execute("PRAGMA synchronous = NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction taken with ``BEGIN IMMEDIATE``.

        A deferred transaction that reads before it writes cannot wait for another thread's
        write lock (SQLite answers "database is locked" at once rather than deadlock); taking
        the lock up front lets the busy timeout do its job.
        """
        db = self.db
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.conn.rollback()
            raise
        db.conn.commit()

    def in_background(self, write: Callable[[], None]) -> Future:
        """Run ``write`` (a store write nobody waits for at once) on the store's writer
        thread, which keeps its own connection; its future re-raises a failure."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="anylearn-store")
            self._last_write = self._writer.submit(write)
            return self._last_write

    def _settled(self) -> None:
        """Wait for the writes started by :meth:`in_background` (one thread, in order), so a
        read sees them; a failed one is not raised here (its future does)."""
        last = self._last_write
        if last is not None:
            wait([last])

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # hash cache ----------------------------------------------------------------------------
    def cached_hashes(self, root: Path) -> dict[str, CachedHash]:
        """Every cache entry for files under ``root`` (absolute), keyed by absolute path."""
        prefix = str(root).rstrip("/") + "/"
        rows = self.db.query(
            "select * from hash_cache where path >= ? and path < ? and schema = ?",
            [prefix, prefix[:-1] + "0", HASH_CACHE_SCHEMA],
        )
        return {
            r["path"]: CachedHash(
                r["size"], r["mtime_ns"], r["inode"], r["sha256"], r["cached_at_ns"]
            )
            for r in rows
        }

    def cached_hashes_of(self, paths: list[str]) -> dict[str, CachedHash]:
        """The cache entries of these files (absolute paths), keyed by absolute path: for a
        few files, cheaper than :meth:`cached_hashes` of their whole folder."""
        found: dict[str, CachedHash] = {}
        for i in range(0, len(paths), SQL_BATCH):
            batch = paths[i : i + SQL_BATCH]
            marks = ",".join("?" * len(batch))  # only "?" marks are formatted in
            query = (
                "select path, size, mtime_ns, inode, sha256, cached_at_ns from hash_cache "  # noqa: S608
                f"where schema = ? and path in ({marks})"
            )
            rows = self.db.execute(query, [HASH_CACHE_SCHEMA, *batch])
            for r in rows:
                found[r[0]] = CachedHash(*r[1:])
        return found

    def save_hashes(
        self, rows: Iterable[tuple[str, int, int, int, str]], cached_at_ns: int
    ) -> None:
        """Record ``(path, size, mtime_ns, inode, sha256)`` rows.

        Args:
            cached_at_ns: when the walk that read these files began (``time.time_ns()``); a
                file whose mtime is not older than this is hashed again next time.
        """
        records = [(p, s, m, i, h, cached_at_ns, HASH_CACHE_SCHEMA) for p, s, m, i, h in rows]
        if records:
            # One prepared statement for every row: sqlite-utils' upsert_all builds a query per
            # batch in Python, which costs more than hashing 20,000 small files.
            with self._write() as db:
                db.conn.executemany(
                    "insert or replace into hash_cache (path, size, mtime_ns, inode, sha256, "
                    "cached_at_ns, schema) values (?, ?, ?, ?, ?, ?, ?)",
                    records,
                )

    def folder_manifest(self, root: str) -> FolderManifest | None:
        """``root``'s last manifest (after the writes still going on in the background)."""
        self._settled()
        rows = list(
            self.db.query(
                "select fingerprint, checksum, file_count, total_bytes, max_mtime_ns, "
                "cached_at_ns from folder_manifests where root = ?",
                [root],
            )
        )
        if not rows:
            return None
        row = rows[0]
        return FolderManifest(
            row["fingerprint"],
            row["checksum"],
            row["file_count"],
            row["total_bytes"],
            row["max_mtime_ns"],
            row["cached_at_ns"],
        )

    def save_folder_manifest(
        self,
        root: str,
        state: FolderManifest,
        entries_z: bytes | None = None,
        walk: bytes | None = None,
    ) -> None:
        """Remember ``root``'s manifest; ``entries_z`` (zlib of its canonical JSON, for an
        archive) or ``walk`` (the folder's walk with its digests, for a folder) lets the next
        version be built from this one and sent as a delta against it."""
        row = {"root": root, **state.__dict__, "entries_z": entries_z, "walk_z": walk}
        # One statement: sqlite-utils' upsert inserts, then updates, writing the walk twice.
        columns = ", ".join(row)
        with self._write() as db:
            db.execute(
                f"insert or replace into folder_manifests ({columns}) "  # noqa: S608 - our names
                f"values ({', '.join(':' + c for c in row)})",
                row,
            )

    def folder_walk(self, root: str) -> bytes | None:
        """The ``walk`` saved with ``root``'s manifest, if any."""
        self._settled()
        rows = list(self.db.query("select walk_z from folder_manifests where root = ?", [root]))
        return rows[0]["walk_z"] if rows else None

    def folder_entries(self, root: str) -> bytes | None:
        """The ``entries_z`` saved with ``root``'s manifest, if any."""
        self._settled()
        rows = list(self.db.query("select entries_z from folder_manifests where root = ?", [root]))
        return rows[0]["entries_z"] if rows else None

    # remote resources ----------------------------------------------------------------------
    def remote_resource(self, server: str, kind: str, checksum: str) -> str | None:
        rows = list(
            self.db["remote_resources"].rows_where(
                "server = ? and kind = ? and checksum = ?", [server, kind, checksum]
            )
        )
        return rows[0]["resource_id"] if rows else None

    def remember_resource(self, server: str, kind: str, checksum: str, resource_id: str, name: str):
        with self._write():
            self.db["remote_resources"].upsert(
                {
                    "server": server,
                    "kind": kind,
                    "checksum": checksum,
                    "resource_id": resource_id,
                    "name": name,
                    "created_at": time.time(),
                },
                pk=("server", "kind", "checksum"),
            )

    def forget_resource(self, server: str, kind: str, checksum: str) -> None:
        with self._write():
            self.db.execute(
                "delete from remote_resources where server = ? and kind = ? and checksum = ?",
                [server, kind, checksum],
            )

    # upload journal ------------------------------------------------------------------------
    def upload_units(self, server: str, resource_id: str) -> dict[str, str]:
        """The journaled units of uploads to ``resource_id``: unit key → tus URL."""
        return {
            r["unit_key"]: r["upload_url"]
            for r in self.db["upload_units"].rows_where(
                "server = ? and resource_id = ?", [server, resource_id]
            )
        }

    def save_upload_unit(
        self, server: str, resource_id: str, unit_key: str, url: str, length: int
    ) -> None:
        """Journal a unit's tus URL (one committed transaction, before its bytes are sent)."""
        with self._write():
            self.db["upload_units"].upsert(
                {
                    "server": server,
                    "resource_id": resource_id,
                    "unit_key": unit_key,
                    "upload_url": url,
                    "length": length,
                    "created_at": time.time(),
                },
                pk=("server", "resource_id", "unit_key"),
            )

    def drop_upload_units(self, server: str, resource_id: str) -> None:
        with self._write():
            self.db.execute(
                "delete from upload_units where server = ? and resource_id = ?",
                [server, resource_id],
            )

    # train tasks ---------------------------------------------------------------------------
    def save_call(
        self,
        server: str,
        call_id: str,
        host: str,
        username: str | None,
        arguments: dict,
        identity: dict,
    ) -> None:
        """Remember a ``quick_train`` call on ``server`` that has not created its task yet:
        its ``arguments``, the ``identity`` of its code and inputs (commit, checksums) when it
        was made, and this process's pid (a call whose process lives is left to it).
        :meth:`record_task` with the same ``call_id`` forgets it, and so does a later call
        with the same arguments (it supersedes this one)."""
        encoded = json.dumps(arguments)
        with self._write():
            # A call made again with the same arguments supersedes the one that died.
            self.db.execute(
                "delete from pending_calls where server = ? and arguments = ?", [server, encoded]
            )
            self.db["pending_calls"].upsert(
                {
                    "server": server,
                    "call_id": call_id,
                    "host": host,
                    "username": username or "",
                    "arguments": encoded,
                    "identity": json.dumps(identity),
                    "pid": os.getpid(),
                    "created_at": time.time(),
                },
                pk=("server", "call_id"),
            )

    def pending_calls(self) -> list[dict]:
        """Calls saved by :meth:`save_call` and not finished, oldest first; ``arguments`` and
        ``identity`` decoded."""
        rows = list(self.db.query("select * from pending_calls order by created_at"))
        for row in rows:
            row["arguments"] = json.loads(row["arguments"])
            row["identity"] = json.loads(row["identity"])
        return rows

    def drop_call(self, server: str, call_id: str) -> None:
        with self._write():
            self.db.execute(
                "delete from pending_calls where server = ? and call_id = ?", [server, call_id]
            )

    def record_task(
        self, server: str, host: str, username: str | None, task: dict, call_id: str = ""
    ) -> None:
        """Record a task just created on ``server`` (``task``: its record as JSON), reached at
        ``host``; the pending call ``call_id`` that created it is forgotten in the same
        transaction."""
        now = time.time()
        with self._write():
            if call_id:
                self.db.execute(
                    "delete from pending_calls where server = ? and call_id = ?",
                    [server, call_id],
                )
            self.db["train_tasks"].upsert(
                {
                    "server": server,
                    "task_id": task["id"],
                    "host": host,
                    "username": username or "",
                    "name": task.get("name") or "",
                    "state": task["state"],
                    "algorithm_id": task.get("algorithm_id") or "",
                    "commit": task.get("commit") or "",
                    "created_at": now,
                    "updated_at": now,
                },
                pk=("server", "task_id"),
            )

    def update_task_state(self, server: str, task_id: str, state: str) -> None:
        with self._write():
            self.db.execute(
                "update train_tasks set state = ?, updated_at = ? where server = ? and task_id = ?",
                [state, time.time(), server, task_id],
            )

    def forget_task(self, server: str, task_id: str) -> None:
        with self._write():
            self.db.execute(
                "delete from train_tasks where server = ? and task_id = ?", [server, task_id]
            )

    def unfinished_tasks(self) -> list[dict]:
        """Rows of tasks whose last known state is not terminal, oldest first."""
        terminal = [s.value for s in TaskState if s.is_terminal]
        marks = ",".join("?" * len(terminal))
        return list(
            self.db.query(
                f"select * from train_tasks where state not in ({marks}) order by created_at",  # noqa: S608
                terminal,
            )
        )

    def count(self, table: str) -> int:
        return self.db[table].count
