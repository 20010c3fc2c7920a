"""A real PostgreSQL server of the tests' own: ``initdb`` and ``pg_ctl`` from the machine's
PostgreSQL (Debian's ``postgresql`` package, which ``.ci/run`` installs), on a free loopback
port, in a temporary folder, with a fresh database for every backend a test starts.

PostgreSQL refuses to run as root; as root, its programs run as the ``postgres`` user the
Debian package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

SUPERUSER = "anylearn"


class PostgresMissing(RuntimeError):
    """PostgreSQL's server programs are not installed."""


def _bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl`` (the newest installed major version).

    Raises:
        PostgresMissing: none is installed.
    """
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not candidates:
        raise PostgresMissing("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster; :meth:`new_database` gives each backend an empty database."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="anylearn-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(self.bindir / program), *args],
            check=True,
            capture_output=True,
            cwd=self.root,
        )

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")  # fmt: skip
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


#: The server the tests' backends use, when they run on PostgreSQL. It lives here, in a module
#: imported under one name, since pytest loads conftest.py both as ``conftest`` and as
#: ``tests.conftest``.
_ACTIVE: PostgresServer | None = None
_DATABASES: dict[Path, str] = {}


def start_or_skip() -> PostgresServer:
    """A started server; the test is skipped where PostgreSQL is not installed, unless
    ``ANYLEARN_TEST_REQUIRE`` names ``postgresql`` (as ``.ci/run`` does), which fails it."""
    try:
        return PostgresServer().start()
    except PostgresMissing as err:
        if "postgresql" in os.environ.get("ANYLEARN_TEST_REQUIRE", "").split(","):
            raise
        pytest.skip(str(err))


def activate(server: PostgresServer | None) -> PostgresServer | None:
    global _ACTIVE
    _ACTIVE = server
    _DATABASES.clear()
    return server


def database_args(data_dir: Path) -> list[str]:
    """The options that put a backend of ``data_dir`` on its own database: none on SQLite
    (the data folder's file), a ``--database-url`` kept per folder on PostgreSQL."""
    if _ACTIVE is None:
        return []
    key = Path(data_dir).resolve()
    if key not in _DATABASES:
        _DATABASES[key] = _ACTIVE.new_database()
    return ["--database-url", _DATABASES[key]]
