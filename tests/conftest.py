"""Fixtures: an isolated HOME per test, a real backend process, a fresh user per test."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from anylearn_sdk import TrainTask, local_backend
from anylearn_sdk import session as sdk_session
from tests import postgres
from tests.postgres import PostgresServer, database_args

FIXTURES = Path(__file__).parent / "fixtures"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


#: The Ray suite runs only inside the loopback-only network ``tests/test_ray.py`` makes.
collect_ignore = [] if os.environ.get("ANYLEARN_RAY_NETNS") == "1" else ["on_ray"]


def pytest_addoption(parser):
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the database of the backends the tests start (postgresql: a server of the "
        "tests' own, see tests/postgres.py)",
    )


def pytest_collection_modifyitems(config, items):
    """With ``--database postgresql``, run the tests of the API: those that start a backend
    (the ``backend`` fixture, :func:`start_server`) or ask for a PostgreSQL server. The
    others talk to no database the option could change; nor do those marked
    ``not_database`` (a backend only hosts what they test, such as ranks or an environment
    build), which are left out to keep CI's second pass short."""
    if config.getoption("--database") != "postgresql":
        return
    keep, skipped = [], []
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        wanted = set(inspect.signature(function).parameters) if function else set()
        asks = bool({"database", "postgres"} & wanted)
        uses = asks or "backend" in getattr(item, "fixturenames", ())  # ``database`` is autouse
        uses = uses and item.get_closest_marker("not_database") is None
        (keep if uses or "start_server(" in source else skipped).append(item)
    config.hook.pytest_deselected(items=skipped)
    items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def database(request):
    """The PostgreSQL server the backends use with ``--database postgresql``, else None."""
    if request.config.getoption("--database") != "postgresql":
        yield None
        return
    server = postgres.activate(PostgresServer().start())
    try:
        yield server
    finally:
        postgres.activate(None)
        server.stop()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets its own HOME and ANYLEARN_HOME and no inherited anylearn settings.

    The machine's pip configuration (its index and wheel folders) stays in force through
    ``PIP_CONFIG_FILE``, so environment builds install what they would outside the tests.
    """
    real_home = Path.home()
    for config in (real_home / ".config/pip/pip.conf", real_home / ".pip/pip.conf"):
        if config.is_file() and "PIP_CONFIG_FILE" not in os.environ:
            monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
            break
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ANYLEARN_HOME", str(home / ".anylearn"))
    monkeypatch.setenv("ANYLEARN_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("ANYLEARN_HOST", "ANYLEARN_TOKEN", "GIT_CONFIG_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    sdk_session.reset()
    yield home
    sdk_session.reset()
    # A test that used the embedded backend (on purpose or not) leaves no server behind.
    local_backend.stop(local_backend.data_dir_for(home / ".anylearn"))


@dataclass
class Backend:
    url: str
    data_dir: Path
    admin_token: str

    def admin(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        url = f"{self.url}/api/v1{path}"
        return requests.request(method, url, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def backend(tmp_path_factory):
    """The real backend process on a random loopback port, started by the SDK's own launcher."""
    data_dir = tmp_path_factory.mktemp("backend") / "data"
    status = local_backend.start(data_dir, options=database_args(data_dir))
    yield Backend(status.url, data_dir, local_backend.admin_token(data_dir))
    local_backend.stop(data_dir)


@dataclass
class User:
    username: str
    password: str
    token: str
    backend: Backend

    def get(self, path: str, **kwargs):
        headers = {"Authorization": f"Bearer {self.token}"}
        response = requests.get(
            f"{self.backend.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )
        response.raise_for_status()
        return response.json()


@pytest.fixture
def user(backend, monkeypatch):
    """A fresh user on the backend, with the SDK connected as that user, and ANYLEARN_HOST and
    ANYLEARN_TOKEN set as that user's, so commands run in the test talk to the same backend."""
    username = f"u{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    backend.admin(
        "POST", "/users", json={"username": username, "password": password}
    ).raise_for_status()
    token = requests.post(
        f"{backend.url}/api/v1/auth/login",
        json={"username": username, "password": password},
        timeout=30,
    ).json()["token"]
    sdk_session.init_sdk(backend.url, token=token)
    monkeypatch.setenv("ANYLEARN_HOST", backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", token)
    return User(username, password, token, backend)


@pytest.fixture
def quota_group(backend):
    """A new quota group of ample capacity, so long tasks of one test never block another's."""
    name = f"g{uuid.uuid4().hex[:10]}"
    backend.admin(
        "POST",
        "/quota-groups",
        json={"name": name, "capacity": {"cpu": 64, "memory_mb": 0, "gpu": 0}},
    ).raise_for_status()
    return name


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def algorithm_repo(tmp_path) -> Path:
    """A git repository holding the test training script, committed."""
    repo = tmp_path / "algo"
    repo.mkdir()
    (repo / "train.py").write_text((FIXTURES / "train.py").read_text())
    (repo / ".gitignore").write_text("ignored/\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "initial", cwd=repo)
    return repo


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    age(data)
    return data


def age(root: Path, seconds: float = 3600) -> None:
    """Set every file's mtime ``seconds`` back, like a dataset written long before it is sent.

    A file modified within the racy margin of a hash is hashed again next time (by design), so
    tests that expect an unchanged folder to be read from the cache start from aged files.
    """
    when = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (when, when))


def repo_state(repo: Path) -> dict:
    """What must not change in the user's repository: HEAD, branch, index, config, status."""
    git_dir = repo / ".git"
    return {
        "head": git("rev-parse", "HEAD", cwd=repo),
        "branch": git("symbolic-ref", "HEAD", cwd=repo),
        "index": (git_dir / "index").read_bytes(),
        "config": (git_dir / "config").read_bytes(),
        "status": git("status", "--porcelain", cwd=repo),
        "refs": git("for-each-ref", cwd=repo),
    }


def start_server(
    data_dir: Path, *args: str, port: int = 0, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """A backend process of the test's own (``args`` are extra options, ``env`` its variables
    instead of the test's); returns it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "anylearn_sdk.server", "--data-dir", str(data_dir),
         "--port", str(port), *database_args(data_dir), *args],
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    address = data_dir / "server.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if address.exists():
            info = json.loads(address.read_text())
            if info["pid"] == proc.pid:
                return proc, info["url"]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the server did not start")


def admin_token(data_dir: Path) -> str:
    return json.loads((data_dir / "admin-credentials.json").read_text())["token"]


def wait_for_log(task: TrainTask, text: str, timeout: float = 60) -> str:
    """The task's log once it contains ``text``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = task.logs()[0]
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log of {task.id}: {task.logs()[0]!r}")


class BadPeer:
    """A listener on loopback that misbehaves: it hangs up on every connection
    (``hang_up=True``, another program that took a port) or holds each one open without a
    word (a stuck server)."""

    def __init__(self, port: int = 0, *, hang_up: bool):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hang_up = hang_up
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.hang_up:
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)
