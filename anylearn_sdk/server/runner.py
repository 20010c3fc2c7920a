"""Run the backend: check, lock, bind, bootstrap the admin user, publish the address, serve.

``python -m anylearn_sdk.server --data-dir DIR [--host 127.0.0.1] [--port 0]``. Nothing is
created before the inputs are checked: an existing data folder is locked first (a second server
on it is refused, naming the first one's pid and address), then the port is bound (a busy port
is refused), and only then is the data folder created and filled. Port 0 reuses the port the
last server of this data folder listened on when it is free (so clients that follow a task find
the local backend where it was), else picks a free one. Once listening, the server writes
``DIR/server.json`` (``{"url", "pid"}``, mode 0600); on the first start it also writes
``DIR/admin-credentials.json`` (``{"username", "password", "token"}``, mode 0600).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from anylearn_sdk.datadir import (
    ADDRESS_FILE,
    ADMIN_CREDENTIALS_FILE,
    DATABASE_FILE,
    AlreadyRunningError,
    ServerLock,
    read_address,
)
from anylearn_sdk.fileutil import write_private_json
from anylearn_sdk.server.api.accounts import create_user, issue_token
from anylearn_sdk.server.app import (
    ExecutorUnavailable,
    ServerOptions,
    build_context,
    create_app,
)
from anylearn_sdk.server.context import DEFAULT_UPLOAD_EXPIRY, ServerContext
from anylearn_sdk.server.db import DatabaseURLError, User, database_url, make_engine
from anylearn_sdk.server.environments import DEFAULT_BUILD_TIMEOUT
from anylearn_sdk.server.scheduler import DEFAULT_MAX_RESTARTS

log = logging.getLogger(__name__)
ADMIN_USERNAME = "admin"
#: Exit status of ``python -m anylearn_sdk.server`` when it cannot start (one line on stderr).
EXIT_CANNOT_START = 1


class StartupError(RuntimeError):
    """The server cannot start: a busy port, an address it cannot listen on, a bad folder."""


def bootstrap_admin(ctx: ServerContext, data_dir: Path) -> None:
    """On first start, create the admin user and store its credentials for local use."""
    with ctx.sessions() as session:
        if session.scalar(select(User).limit(1)) is not None:
            return
        password = secrets.token_urlsafe(18)
        user = create_user(session, ADMIN_USERNAME, password, is_admin=True)
        token, _ = issue_token(session, user, ADMIN_USERNAME)
        write_private_json(
            data_dir / ADMIN_CREDENTIALS_FILE,
            {"username": ADMIN_USERNAME, "password": password, "token": token},
        )
        session.commit()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``.

    Accepted connections inherit ``TCP_NODELAY`` from the listening socket (Linux), so the
    small responses to chunked uploads are never held back by Nagle's algorithm.

    Raises:
        OSError: the address cannot be bound (``errno.EADDRINUSE`` for a busy port).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _last_port(data_dir: Path, host: str) -> int | None:
    """The port the last server of ``data_dir`` listened on, if it listened on ``host``."""
    address = read_address(data_dir) if data_dir.is_dir() else None
    if address is None:
        return None
    parts = urlsplit(address.url)
    return parts.port if parts.hostname == host.strip("[]") else None


def bind(host: str, port: int, data_dir: Path) -> socket.socket:
    """Listen on ``host:port``; port 0 first tries the data folder's last port.

    Raises:
        StartupError: the port is busy, or the address cannot be listened on.
    """
    if port == 0:
        last = _last_port(data_dir, host)
        if last:
            try:
                return _listen(host, last)
            except OSError:
                pass  # taken by now: any free port will do
    try:
        return _listen(host, port)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is in use; choose another --port, or 0 for a free one"
            ) from err
        raise StartupError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err


def serve(
    host: str,
    port: int,
    data_dir: Path,
    options: ServerOptions | None = None,
    database_url: str | None = None,
) -> None:
    """Check, lock, bind, then serve until SIGINT/SIGTERM (see the module docstring).

    ``options`` say how (:class:`ServerOptions`); ``database_url`` is where the metadata
    lives (None: SQLite in the data folder).

    Raises:
        AlreadyRunningError: another server holds the data folder.
        StartupError: the port is busy, the address or the data folder cannot be used.
    """
    data_dir = data_dir.expanduser().resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise StartupError(f"--data-dir {data_dir} exists and is not a folder")
    lock = ServerLock(data_dir)
    if data_dir.is_dir():
        lock.acquire()  # before anything else, so a second server changes nothing
    try:
        sock = bind(host, port, data_dir)
        try:
            # A database of its own is checked (and migrated) before the folder is created.
            engine = open_database(database_url) if database_url else None
            if not lock.held:
                try:
                    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                except OSError as err:
                    raise StartupError(f"cannot create --data-dir {data_dir}: {err}") from err
                lock.acquire()
            if engine is None:
                engine = open_database(f"sqlite:///{data_dir / DATABASE_FILE}")
            _run(sock, data_dir, engine, options or ServerOptions())
        finally:
            sock.close()
    finally:
        lock.release()


def open_database(url: str) -> Engine:
    """The engine for ``url``, its schema migrated to the newest.

    Raises:
        StartupError: the URL names another kind of database, or it cannot be reached.
    """
    try:
        return make_engine(url)
    except DatabaseURLError as err:
        raise StartupError(str(err)) from None
    except OperationalError as err:
        shown = database_url(url).render_as_string(hide_password=True)
        reason = str(err.orig or err).strip().splitlines()[0]
        raise StartupError(f"cannot use the database {shown}: {reason}") from None


def _run(sock: socket.socket, data_dir: Path, engine: Engine, options: ServerOptions) -> None:
    host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if sock.family == socket.AF_INET6 else host
    url = f"http://{shown_host}:{bound_port}"
    try:
        ctx = build_context(data_dir, engine, options, url)
    except ExecutorUnavailable as err:
        raise StartupError(str(err)) from None
    bootstrap_admin(ctx, data_dir)
    write_private_json(data_dir / ADDRESS_FILE, {"url": url, "pid": os.getpid()})
    log.info(
        "anylearn backend listening at %s (data %s, executor %s, pid %d)",
        url,
        data_dir,
        options.executor,
        os.getpid(),
    )
    config = uvicorn.Config(
        create_app(ctx), log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    """``python -m anylearn_sdk.server``: parse, then :func:`serve`. A server that cannot start
    prints one line on stderr and exits with :data:`EXIT_CANNOT_START`."""
    parser = argparse.ArgumentParser(prog="python -m anylearn_sdk.server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument(
        "--upload-expiry",
        type=float,
        default=DEFAULT_UPLOAD_EXPIRY,
        help="seconds an unfinished upload is kept after its last byte (default: one day)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=DEFAULT_MAX_RESTARTS,
        help="times a task whose processes were lost (server or machine restart) is run again "
        f"in its working directory before it fails (default: {DEFAULT_MAX_RESTARTS})",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPU devices tasks may be given, as CUDA_VISIBLE_DEVICES indices 0..N-1 "
        "(default: as many as `nvidia-smi -L` lists)",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where tasks run: processes on this machine, or a Ray cluster (default: local)",
    )
    parser.add_argument(
        "--ray-address",
        default="auto",
        help="the Ray cluster for --executor ray: auto (the local node's), HOST:PORT or "
        "ray://HOST:PORT (default: auto)",
    )
    parser.add_argument(
        "--ray-node-cache",
        default=None,
        help="where each Ray node caches code, data and environments, as <it>/<node id> "
        "(default: /tmp/anylearn-node-cache)",
    )
    parser.add_argument(
        "--ray-output-sync",
        type=float,
        default=30.0,
        help="seconds between two copies of node 0's output to the backend while a Ray task "
        "runs (a lost task's next attempt starts from the last copy; default: 30)",
    )
    parser.add_argument(
        "--ray-shared-data",
        default=None,
        help="the data folder as the Ray nodes see it, when they share it (a network file "
        "system): they read code and objects from it instead of fetching them over HTTP",
    )
    parser.add_argument(
        "--ray-backend-url",
        default=None,
        help="this backend's address as Ray nodes reach it (default: the one it listens on)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="where the metadata lives: postgresql://USER@HOST:PORT/DB (its password in "
        "PGPASSWORD or ~/.pgpass, not in the URL) or sqlite:///PATH (default: SQLite in the "
        "data folder)",
    )
    parser.add_argument(
        "--build-timeout",
        type=float,
        default=DEFAULT_BUILD_TIMEOUT,
        help="seconds one step of an environment build (venv, pip install) may run before it "
        f"is killed and its tasks fail (default: {DEFAULT_BUILD_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    for option in ("max_restarts", "gpus"):
        if (getattr(args, option) or 0) < 0:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: use 0 or more")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: use 0..65535")
    for option in ("upload_expiry", "build_timeout", "ray_output_sync"):
        if getattr(args, option) <= 0:
            flag = f"--{option.replace('_', '-')}"
            parser.error(f"{flag} {getattr(args, option)}: use a positive number of seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        options = ServerOptions(
            upload_expiry=args.upload_expiry,
            max_restarts=args.max_restarts,
            gpus=args.gpus,
            build_timeout=args.build_timeout,
            executor=args.executor,
            ray_address=args.ray_address,
            ray_node_cache=args.ray_node_cache,
            backend_url=args.ray_backend_url,
            ray_output_sync=args.ray_output_sync,
            ray_shared_data=args.ray_shared_data,
        )
        serve(args.host, args.port, args.data_dir, options, args.database_url)
    except (AlreadyRunningError, StartupError) as err:
        sys.stderr.write(f"Error: {err}\n")
        raise SystemExit(EXIT_CANNOT_START) from None
