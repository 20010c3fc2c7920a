"""The backend's data folder: the files both halves know by name, and the one-server lock.

Shared by the SDK (which starts, finds and stops the local backend) and the server (which
holds the lock); standard library only, so importing it costs nothing.

One data folder has exactly one server. The server takes an exclusive ``flock(2)`` on
``server.lock`` before it creates anything and holds it for its whole life; the kernel releases
it when the process ends, however it ends (SIGKILL included), so a stale lock cannot exist. The
holder writes its pid into the file. Whether a server runs is therefore read from the lock, not
from ``server.json``: that file only says where the server listens (``{"url", "pid"}``) and is
left in place when the server stops, so the next start can listen on the same port again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

#: ``{"url", "pid"}`` of the server that last listened (mode 0600).
ADDRESS_FILE = "server.json"
#: Held with an exclusive flock by the running server; holds its pid.
LOCK_FILE = "server.lock"
#: ``{"username", "password", "token"}`` of the admin user the first start created (mode 0600).
ADMIN_CREDENTIALS_FILE = "admin-credentials.json"
#: stdout and stderr of a server started in the background by the SDK.
LOG_FILE = "server.log"
#: The server's stable identity (hex), which the local store keys its rows by.
SERVER_ID_FILE = "server-id"
#: The SQLite database of the default configuration.
DATABASE_FILE = "anylearn-server.db"
#: Seconds a server keeps trying to take the lock (a status probe holds it for microseconds).
LOCK_WAIT_SECONDS = 2.0


class AlreadyRunningError(RuntimeError):
    """Another server holds the data folder's lock.

    Attributes:
        pid: the running server's pid (None if it has not written it yet).
        url: where it listens (None while it starts).
    """

    def __init__(self, data_dir: Path, pid: int | None, url: str | None):
        where = f" at {url}" if url else " (starting)"
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"a server already runs on {data_dir} ({who}){where}")
        self.pid = pid
        self.url = url


@dataclass(frozen=True)
class Address:
    """What ``server.json`` says: the URL the server with ``pid`` listened on."""

    url: str
    pid: int


def read_address(data_dir: Path) -> Address | None:
    """The address the last server of ``data_dir`` published, or None."""
    try:
        data = json.loads((data_dir / ADDRESS_FILE).read_text(encoding="utf-8"))
        return Address(str(data["url"]), int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_holder(data_dir: Path) -> int | None:
    """The pid of the server holding ``data_dir``'s lock; 0 if it holds it but has not written
    its pid yet; None if no server holds it."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raw = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
            return int(raw) if raw.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_server(data_dir: Path) -> tuple[int, str | None] | None:
    """``(pid, url)`` of the server running on ``data_dir`` (``url`` None while it starts),
    or None if none runs."""
    pid = lock_holder(data_dir)
    if pid is None:
        return None
    address = read_address(data_dir)
    url = address.url if address is not None and address.pid == pid else None
    return pid, url


class ServerLock:
    """The exclusive lock a server holds on its data folder for its whole life."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = LOCK_WAIT_SECONDS) -> None:
        """Take the lock (the data folder must exist) and write this process's pid into it.

        The descriptor is close-on-exec, so task processes the server starts (which may outlive
        it) never hold the lock.

        Raises:
            AlreadyRunningError: another live process holds it (still after ``wait`` seconds).
        """
        if self._fd is not None:
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    found = running_server(self.data_dir)
                    pid, url = found if found is not None else (None, None)
                    raise AlreadyRunningError(self.data_dir, pid or None, url) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
