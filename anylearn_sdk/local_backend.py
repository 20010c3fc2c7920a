"""The embedded local backend: the reference server on 127.0.0.1, data under ``ANYLEARN_HOME``.

Like ``ray.init()`` starting a local cluster, the SDK starts this backend itself when nothing
else is configured; ``anylearn server start|stop|status`` manage the same one. Its data lives in
``ANYLEARN_HOME/server``; the running server publishes ``server.json`` (``{"url", "pid"}``)
there, and its first start writes ``admin-credentials.json`` (mode 0600) whose token the SDK
uses.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from anylearn_sdk.errors import LocalBackendError

SERVER_DIR = "server"
ADDRESS_FILE = "server.json"
ADMIN_CREDENTIALS_FILE = "admin-credentials.json"
LOG_FILE = "server.log"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
HEALTH_TIMEOUT_SECONDS = 2.0
#: Backends this process launched, by pid: kept so they are reaped (no zombie, no warning).
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class BackendStatus:
    """What ``anylearn server status`` shows: ``url`` and ``pid`` are None when not running."""

    data_dir: Path
    url: str | None
    pid: int | None

    @property
    def running(self) -> bool:
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
    """Whether the backend of ``data_dir`` is up, judged by its address file and health check."""
    try:
        info = json.loads((data_dir / ADDRESS_FILE).read_text())
    except (OSError, ValueError):
        return BackendStatus(data_dir, None, None)
    url, pid = info.get("url"), info.get("pid")
    if url and _healthy(url):
        return BackendStatus(data_dir, url, pid)
    return BackendStatus(data_dir, None, None)


@contextmanager
def _start_lock(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(data_dir / ".start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = START_TIMEOUT_SECONDS,
    options: Sequence[str] = (),
) -> BackendStatus:
    """Start the backend of ``data_dir`` as a detached process unless it already runs.

    ``options`` are further ``python -m anylearn_sdk.server`` options (``--gpus 2``).

    Returns:
        The running backend's status.

    Raises:
        LocalBackendError: the ``server`` extra is not installed, or the server did not answer
            its health check within ``timeout`` seconds (the message names its log file).
    """
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise LocalBackendError(
            "the local backend needs the server extra: pip install 'anylearn-sdk[server]' "
            "(or point the SDK at a backend with ANYLEARN_HOST)"
        )
    with _start_lock(data_dir):
        current = status(data_dir)
        if current.running:
            return current
        (data_dir / ADDRESS_FILE).unlink(missing_ok=True)
        log_path = data_dir / LOG_FILE
        with open(log_path, "ab") as log:
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = status(data_dir)
            if current.running:
                return current
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise LocalBackendError(f"the local backend did not start; see {log_path}")


def stop(data_dir: Path, *, timeout: float = STOP_TIMEOUT_SECONDS) -> bool:
    """Stop the backend of ``data_dir`` (SIGTERM). Returns False if it was not running."""
    current = status(data_dir)
    if not current.running or current.pid is None:
        return False
    try:
        os.kill(current.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    child = _children.pop(current.pid, None)
    if child is not None:
        try:
            child.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            pass
    else:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(current.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
    raise LocalBackendError(f"the local backend (pid {current.pid}) did not stop in {timeout} s")


def admin_token(data_dir: Path) -> str:
    """The admin token the backend wrote on its first start."""
    try:
        return json.loads((data_dir / ADMIN_CREDENTIALS_FILE).read_text())["token"]
    except (OSError, ValueError, KeyError) as err:
        raise LocalBackendError(f"no admin credentials in {data_dir}: {err}") from err
