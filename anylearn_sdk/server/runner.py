"""Run the backend: bind, bootstrap the admin user, publish the address, serve.

``python -m anylearn_sdk.server --data-dir DIR [--host 127.0.0.1] [--port 0]``. Port 0 picks a
free port. Once listening, the server writes ``DIR/server.json`` (``{"url", "pid"}``, mode
0600); on the first start it also writes ``DIR/admin-credentials.json`` (``{"username",
"password", "token"}``, mode 0600) for local use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
from pathlib import Path

import uvicorn
from sqlalchemy import select

from anylearn_sdk.fileutil import write_private_json
from anylearn_sdk.local_backend import ADDRESS_FILE, ADMIN_CREDENTIALS_FILE
from anylearn_sdk.server.api.accounts import create_user, issue_token
from anylearn_sdk.server.app import build_context, create_app
from anylearn_sdk.server.context import DEFAULT_UPLOAD_EXPIRY, ServerContext
from anylearn_sdk.server.db import User
from anylearn_sdk.server.scheduler import DEFAULT_MAX_RESTARTS

ADMIN_USERNAME = "admin"


def bootstrap_admin(ctx: ServerContext, data_dir: Path) -> None:
    """On first start, create the admin user and store its credentials for local use."""
    with ctx.sessions() as session:
        if session.scalar(select(User).limit(1)) is not None:
            return
        password = secrets.token_urlsafe(18)
        user = create_user(session, ADMIN_USERNAME, password, is_admin=True)
        token = issue_token(session, user)
        write_private_json(
            data_dir / ADMIN_CREDENTIALS_FILE,
            {"username": ADMIN_USERNAME, "password": password, "token": token},
        )
        session.commit()


def serve(
    host: str,
    port: int,
    data_dir: Path,
    upload_expiry: float = DEFAULT_UPLOAD_EXPIRY,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    gpus: int | None = None,
) -> None:
    """Bind ``host:port`` (0 = any free port), then serve until SIGINT/SIGTERM.

    ``gpus`` is the number of GPU devices tasks may be given (None: as many as ``nvidia-smi
    -L`` lists).

    Accepted connections inherit ``TCP_NODELAY`` from the listening socket (Linux), so the
    small responses to chunked uploads are never held back by Nagle's algorithm.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ctx = build_context(data_dir, upload_expiry=upload_expiry, max_restarts=max_restarts, gpus=gpus)
    bootstrap_admin(ctx, data_dir)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown_host}:{bound_port}"
    address_file = data_dir / ADDRESS_FILE
    write_private_json(address_file, {"url": url, "pid": os.getpid()})
    config = uvicorn.Config(
        create_app(ctx), log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        try:
            if json.loads(address_file.read_text()).get("pid") == os.getpid():
                address_file.unlink()
        except (OSError, ValueError):
            pass


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    for option in ("max_restarts", "gpus"):
        if (getattr(args, option) or 0) < 0:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: use 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(args.host, args.port, args.data_dir, args.upload_expiry, args.max_restarts, args.gpus)
