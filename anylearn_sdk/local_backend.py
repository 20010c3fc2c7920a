"""The embedded local backend: the reference server on 127.0.0.1, data under ``ANYLEARN_HOME``.

Like ``ray.init()`` starting a local cluster, the SDK starts this backend itself when nothing
else is configured; ``anylearn server start|stop|status`` manage the same one. Its data lives in
``ANYLEARN_HOME/server``. A data folder has one server at most: it holds the folder's lock
(:mod:`anylearn_sdk.datadir`), which is how a running server is found, and publishes where it
listens in ``server.json``. Its first start writes ``admin-credentials.json`` (mode 0600),
whose token the SDK uses.

The backend listens on the same port at every start while that port is free, and clients of it
re-read ``server.json`` before each retry (:func:`current_url`), so following a task survives a
``server stop`` / ``server start``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from anylearn_sdk.datadir import ADMIN_CREDENTIALS_FILE, LOG_FILE, running_server
from anylearn_sdk.errors import LocalBackendError

SERVER_DIR = "server"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
HEALTH_TIMEOUT_SECONDS = 2.0
#: Backends this process launched, by pid: kept so they are reaped (no zombie, no warning).
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class BackendStatus:
    """What ``anylearn server status`` shows.

    Attributes:
        data_dir: the backend's data folder.
        pid: the server holding the folder's lock, or None when none runs.
        url: where it answers; None when none runs, or while it starts.
    """

    data_dir: Path
    url: str | None
    pid: int | None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def ready(self) -> bool:
        return self.url is not None


def data_dir_for(home: Path) -> Path:
    return home / SERVER_DIR


def _healthy(url: str) -> bool:
    try:
        response = requests.get(f"{url}/api/v1/health", timeout=HEALTH_TIMEOUT_SECONDS)
    except requests.RequestException:
        return False
    return response.status_code == 200


def status(data_dir: Path) -> BackendStatus:
    """Whether a server runs on ``data_dir``, read from the folder's lock (not from
    ``server.json``, which outlives the server), and its URL once it answers."""
    found = running_server(data_dir)
    if found is None:
        return BackendStatus(data_dir, None, None)
    pid, url = found
    return BackendStatus(data_dir, url if url and _healthy(url) else None, pid or None)


def current_url(data_dir: Path) -> str | None:
    """Where the server of ``data_dir`` listens now (no health check), or None if none runs.

    Cheap (a lock probe and a small file read): clients call it before each retry.
    """
    found = running_server(data_dir)
    return found[1] if found is not None else None


@contextmanager
def _start_lock(data_dir: Path):
    """Serializes starts from several SDK processes (one spawns, the others find it)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(data_dir / ".start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def require_server_extra() -> None:
    """Raises:
    LocalBackendError: the ``server`` extra (FastAPI, uvicorn) is not installed."""
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise LocalBackendError(
            "the local backend needs the server extra: pip install 'anylearn-sdk[server]' "
            "(or point the SDK at a backend with ANYLEARN_HOST)"
        )


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise LocalBackendError(
                f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port, "
                "or 0 for a free one"
            ) from err


def start(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = START_TIMEOUT_SECONDS,
    options: Sequence[str] = (),
) -> BackendStatus:
    """Start the backend of ``data_dir`` as a detached process unless one already runs there.

    ``options`` are further ``python -m anylearn_sdk.server`` options (``--gpus 2``).

    Returns:
        The running backend's status (the one already running, if any: ``host``, ``port`` and
        ``options`` then do not apply).

    Raises:
        LocalBackendError: the ``server`` extra is not installed, or the server did not answer
            its health check within ``timeout`` seconds; the message is the server's own
            one-line reason (a busy port, say) or names its log file.
    """
    require_server_extra()
    if port:
        _check_port_free(host, port)  # before the data folder is made
    with _start_lock(data_dir):
        deadline = time.monotonic() + timeout
        proc = None
        if not status(data_dir).running:
            log_path = data_dir / LOG_FILE
            with open(log_path, "ab") as log:
                log.write(f"--- starting on {host}:{port or 'last or any port'}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "anylearn_sdk.server",
                        "--data-dir",
                        str(data_dir),
                        "--host",
                        host,
                        "--port",
                        str(port),
                        *options,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            _children[proc.pid] = proc
        while time.monotonic() < deadline:
            current = status(data_dir)
            if current.ready:
                return current
            if proc is not None and proc.poll() is not None and not current.running:
                reason = _last_line(data_dir / LOG_FILE)
                raise LocalBackendError(
                    f"the local backend did not start: {reason} (log: {data_dir / LOG_FILE})"
                )
            time.sleep(0.05)
        raise LocalBackendError(
            f"the local backend did not answer within {timeout:g} s; see {data_dir / LOG_FILE}"
        )


def stop(data_dir: Path, *, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
    """Stop the server of ``data_dir`` (SIGTERM) and wait until it released the folder.

    Returns:
        The pid it stopped, or None if none was running.

    Raises:
        LocalBackendError: it still held the folder after ``timeout`` seconds.
    """
    found = running_server(data_dir)
    if found is None:
        return None
    pid = found[0]
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_server(data_dir) is None:
            child = _children.pop(pid, None)
            if child is not None:
                child.wait()
            return pid
        time.sleep(0.05)
    raise LocalBackendError(f"the local backend (pid {pid}) did not stop in {timeout:g} s")


def admin_token(data_dir: Path) -> str:
    """The admin token the backend wrote on its first start."""
    try:
        return json.loads((data_dir / ADMIN_CREDENTIALS_FILE).read_text())["token"]
    except (OSError, ValueError, KeyError) as err:
        raise LocalBackendError(f"no admin credentials in {data_dir}: {err}") from err
