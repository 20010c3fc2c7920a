"""The server's shared state, its error type, and the FastAPI dependencies every router uses."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from anylearn_sdk.server.db import Token, TrainTask, User, as_utc, utcnow
from anylearn_sdk.server.objects import ObjectStore
from anylearn_sdk.states import ErrorCode, TaskState
from anylearn_sdk.wire import API_PREFIX

if TYPE_CHECKING:
    from anylearn_sdk.server.scheduler import Scheduler


@dataclass
class ServerPaths:
    """The data directory's layout."""

    root: Path
    objects: Path = field(init=False)
    repos: Path = field(init=False)
    uploads: Path = field(init=False)
    tasks: Path = field(init=False)
    materialized: Path = field(init=False)
    environments: Path = field(init=False)

    def __post_init__(self) -> None:
        self.objects = self.root / "objects"
        self.repos = self.root / "repos"
        self.uploads = self.root / "uploads"
        self.tasks = self.root / "tasks"
        self.materialized = self.root / "materialized"
        self.environments = self.root / "environments"
        for p in (self.objects, self.repos, self.uploads, self.tasks, self.materialized):
            p.mkdir(parents=True, exist_ok=True)

    def repo(self, algorithm_id: str) -> Path:
        return self.repos / f"{algorithm_id}.git"


#: Seconds an unfinished upload is kept after its last byte (tus §Expiration).
DEFAULT_UPLOAD_EXPIRY = 24 * 3600.0


@dataclass
class ServerContext:
    """What every request handler and worker thread shares.

    Attributes:
        upload_expiry: seconds an upload lives after its last byte arrived.
        io: threads that write and hash upload bodies off the event loop.
    """

    paths: ServerPaths
    sessions: sessionmaker
    objects: ObjectStore
    scheduler: Scheduler
    server_id: str
    upload_expiry: float = DEFAULT_UPLOAD_EXPIRY
    io: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="anylearn-io")
    )


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: ErrorCode, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found(kind: str, resource_id: str) -> ApiError:
    return ApiError(404, ErrorCode.NOT_FOUND, f"{kind} {resource_id!r} not found")


def bad_request(message: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_REQUEST, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, ErrorCode.CONFLICT, message)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# The dependencies are coroutines so that a request does not hop to a worker thread for each
# of them; they only read (a token lookup by primary key), which never waits under WAL.
async def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


async def get_session(
    ctx: Annotated[ServerContext, Depends(get_context)],
) -> AsyncIterator[Session]:
    with ctx.sessions() as session:
        yield session


async def current_user(request: Request, session: Annotated[Session, Depends(get_session)]) -> User:
    """Resolve ``Authorization: Bearer <token>`` to its user, or answer 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "missing bearer token")
    return user_for_token(session, token.strip(), request)


def user_for_token(session: Session, token: str, request: Request) -> User:
    """The user of ``token`` (an API token, a task's, or a web session's), or ApiError 401
    (403 for a task's token outside its scope)."""
    row = session.scalar(select(Token).where(Token.token_sha256 == hash_token(token)))
    if row is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "invalid or revoked token")
    if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, f"token {row.id} expired; create a new one")
    user = session.get(User, row.user_id)
    if user is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "invalid or revoked token")
    if row.task_id is not None:
        check_task_scope(session, row.task_id, request)
    return user


#: What a task's token may call: git fetch of the task's algorithm, the versions the task
#: mounts (their manifests), and objects by sha256 (the owner's, as for any token).
_TASK_SCOPE = re.compile(
    rf"^{API_PREFIX}/(?:objects/[0-9a-f]{{64}}"
    r"|(?:datasets|models)/(?P<resource>[^/]+)"
    r"|algorithms/(?P<algorithm>[^/]+)/git/(?P<git>info/refs|git-upload-pack))$"
)


def check_task_scope(session: Session, task_id: str, request: Request) -> None:
    """Refuse a task's token outside its scope (403) or once its task ended (401)."""
    task = session.get(TrainTask, task_id)
    if task is None or TaskState(task.state).is_terminal:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, f"the token of task {task_id} expired")
    match = _TASK_SCOPE.match(request.url.path)
    refused = match is None or request.method not in ("GET", "HEAD", "POST")
    if match is not None and not refused:
        mounted = {ref for mount in (task.mounts or {}).values() for ref in mount.get("ids", [])}
        git = match["git"]
        refused = (
            (match["resource"] is not None and match["resource"] not in mounted)
            or (match["algorithm"] is not None and match["algorithm"] != task.algorithm_id)
            or (git == "info/refs" and request.query_params.get("service") != "git-upload-pack")
            or (git is None and request.method == "POST")
        )
    if refused:
        raise ApiError(
            403, ErrorCode.FORBIDDEN, f"the token of task {task_id} only fetches its code and data"
        )


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise ApiError(403, ErrorCode.FORBIDDEN, "this call needs an admin user")
    return user


Ctx = Annotated[ServerContext, Depends(get_context)]
DB = Annotated[Session, Depends(get_session)]
CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
