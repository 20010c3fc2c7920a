"""The ASGI application: routers under ``/api/v1``, JSON errors, scheduler lifecycle."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anylearn_sdk._version import __version__
from anylearn_sdk.datadir import SERVER_ID_FILE
from anylearn_sdk.server import web
from anylearn_sdk.server.api import accounts, algorithms, resources, runtime, tasks, uploads
from anylearn_sdk.server.api.accounts import issue_task_token
from anylearn_sdk.server.api.runtime import DEFAULT_QUOTA_GROUP
from anylearn_sdk.server.context import (
    DEFAULT_UPLOAD_EXPIRY,
    ApiError,
    ServerContext,
    ServerPaths,
)
from anylearn_sdk.server.db import Mirror, QuotaGroup, make_sessionmaker
from anylearn_sdk.server.environments import DEFAULT_BUILD_TIMEOUT, Environments
from anylearn_sdk.server.executors.base import Executor
from anylearn_sdk.server.executors.local import LocalExecutor, detect_gpus
from anylearn_sdk.server.objects import ObjectStore
from anylearn_sdk.server.scheduler import DEFAULT_MAX_RESTARTS, Scheduler
from anylearn_sdk.server.web import SecurityHeaders
from anylearn_sdk.server.workspace import Workspace
from anylearn_sdk.states import ErrorCode
from anylearn_sdk.wire import API_PREFIX, TUS_VERSION, Health

log = logging.getLogger(__name__)
QUICKSTART_MIRROR = "QUICKSTART"
_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.BAD_REQUEST,
    409: ErrorCode.CONFLICT,
}


def _error(status: int, code: ErrorCode | str, message: str, request: Request) -> JSONResponse:
    headers = {}
    if request.url.path.startswith(f"{API_PREFIX}/uploads"):
        headers["Tus-Resumable"] = TUS_VERSION
        if status == 412:  # tus 1.0 §Core "Tus-Resumable": the versions the server speaks
            headers["Tus-Version"] = TUS_VERSION
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="anylearn"'
    return JSONResponse(
        {"error": {"code": str(getattr(code, "value", code)), "message": message}},
        status_code=status,
        headers=headers,
    )


def _validation_message(err: RequestValidationError) -> str:
    first = err.errors()[0] if err.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    value = first.get("input")
    shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
    return f"{where or 'request'}: {first.get('msg', 'invalid')}{shown}"


def ensure_defaults(ctx: ServerContext, *, gpus: int = 0) -> None:
    """Create the QUICKSTART mirror and the ``default`` quota group (this machine's CPUs,
    half its memory and ``gpus`` GPUs) if they are missing."""
    with ctx.sessions() as session:
        if session.scalar(select(Mirror).where(Mirror.name == QUICKSTART_MIRROR)) is None:
            session.add(Mirror(name=QUICKSTART_MIRROR, python=sys.executable))
        if session.scalar(select(QuotaGroup).where(QuotaGroup.name == DEFAULT_QUOTA_GROUP)) is None:
            memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
            session.add(
                QuotaGroup(
                    name=DEFAULT_QUOTA_GROUP,
                    capacity={
                        "cpu": float(os.cpu_count() or 1),
                        "memory_mb": memory_mb,
                        "gpu": gpus,
                    },
                    default_request={"cpu": 1.0, "memory_mb": 0, "gpu": 0},
                )
            )
        session.commit()


@dataclass(frozen=True)
class ServerOptions:
    """How the backend runs (``python -m anylearn_sdk.server --help`` describes each).

    Attributes:
        upload_expiry: seconds an unfinished upload is kept after its last byte.
        max_restarts: re-runs of a task whose processes were lost.
        gpus: GPU devices local tasks may be given (None: as many as ``nvidia-smi -L`` lists).
        build_timeout: seconds one environment build step may run.
        executor: ``local`` or ``ray``.
        ray_address: the Ray cluster (``auto``, ``HOST:PORT``); for the ``ray`` executor.
        ray_node_cache: where each Ray node keeps its cache (``<it>/<node id>``).
        backend_url: the backend's address as Ray nodes reach it (None: where it listens).
        ray_output_sync: seconds between two copies of node 0's output to the backend.
        ray_shared_data: the data folder as Ray nodes see it, when they share it (None: they
            fetch code and data over HTTP).
    """

    upload_expiry: float = DEFAULT_UPLOAD_EXPIRY
    max_restarts: int = DEFAULT_MAX_RESTARTS
    gpus: int | None = None
    build_timeout: float = DEFAULT_BUILD_TIMEOUT
    executor: str = "local"
    ray_address: str = "auto"
    ray_node_cache: str | None = None
    backend_url: str | None = None
    ray_output_sync: float = 30.0
    ray_shared_data: str | None = None


class ExecutorUnavailable(RuntimeError):
    """The executor asked for cannot run here (its extra is not installed, say)."""


def _ray_executor(
    options: ServerOptions, sessions: sessionmaker, paths: ServerPaths, server_id: str, url: str
) -> Executor:
    try:
        from anylearn_sdk.server.executors.ray import DEFAULT_NODE_CACHE, RayExecutor
    except ImportError as err:
        raise ExecutorUnavailable(
            f"--executor ray needs Ray: pip install 'anylearn-sdk[server,ray]' ({err})"
        ) from None
    try:
        return RayExecutor(
            address=options.ray_address,
            namespace=f"anylearn-{server_id[:12]}",
            sessions=sessions,
            tasks_root=paths.tasks,
            backend_url=options.backend_url or url,
            issue_token=issue_task_token,
            node_cache=options.ray_node_cache or DEFAULT_NODE_CACHE,
            output_sync=options.ray_output_sync,
            shared_data=options.ray_shared_data,
        )
    except ConnectionError as err:
        raise ExecutorUnavailable(f"--ray-address {options.ray_address}: {err}") from None


def build_context(
    data_dir: Path, engine: Engine, options: ServerOptions, url: str = ""
) -> ServerContext:
    """Everything the backend shares, on ``engine``'s database, listening at ``url``.

    Raises:
        ExecutorUnavailable: the executor asked for cannot run here.
    """
    paths = ServerPaths(data_dir)
    sessions = make_sessionmaker(engine)
    objects = ObjectStore(paths.objects)
    id_file = paths.root / SERVER_ID_FILE
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex)
    server_id = id_file.read_text().strip()
    executor: Executor
    if options.executor == "ray":
        executor = _ray_executor(options, sessions, paths, server_id, url)
    else:
        workspace = Workspace(
            sessions=sessions,
            objects=objects,
            repos_root=paths.repos,
            tasks_root=paths.tasks,
            materialized_root=paths.materialized,
            environments=Environments(paths.environments, build_timeout=options.build_timeout),
        )
        gpus = detect_gpus() if options.gpus is None else options.gpus
        executor = LocalExecutor(workspace, gpus=gpus)
    scheduler = Scheduler(
        sessions=sessions,
        tasks_root=paths.tasks,
        executor=executor,
        runner_id=server_id,
        max_restarts=options.max_restarts,
    )
    ctx = ServerContext(
        paths=paths,
        sessions=sessions,
        objects=objects,
        scheduler=scheduler,
        server_id=server_id,
        upload_expiry=options.upload_expiry,
    )
    ensure_defaults(ctx, gpus=executor.gpus)
    return ctx


def create_app(ctx: ServerContext) -> FastAPI:
    """The FastAPI app for ``ctx``; the scheduler runs for the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        sweep = uploads.sweep_seconds(ctx)
        ctx.scheduler.add_periodic(sweep, lambda: uploads.expire_uploads(ctx))
        ctx.objects.sweep_temporaries()  # before any upload can write one
        uploads.recover_packs(ctx)
        ctx.scheduler.start()
        uploads.resume_verification(ctx)
        try:
            yield
        finally:
            ctx.scheduler.stop()
            ctx.io.shutdown(wait=True)

    app = FastAPI(title="anylearn reference backend", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, ErrorCode.BAD_REQUEST, _validation_message(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
        return _error(exc.status_code, code, str(exc.detail), request)

    @app.exception_handler(DataError)
    async def _refused_value(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the API let through: a NUL character or an integer
        # beyond 64 bits on PostgreSQL. That is the request's fault, not the server's.
        reason = str(exc.orig or exc).strip().splitlines()[0]
        message = f"the database refused a value: {reason}"
        return _error(400, ErrorCode.BAD_REQUEST, message, request)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, ErrorCode.INTERNAL, "internal server error; see the server log", request)

    api = APIRouter(prefix=API_PREFIX)

    @api.get("/health", tags=["health"], response_model=Health)
    async def health() -> Health:
        return Health(version=__version__, server_id=ctx.server_id)

    for module_router in (
        accounts.router,
        algorithms.router,
        resources.make_router("dataset"),
        resources.make_router("model"),
        resources.objects_router,
        uploads.router,
        runtime.router,
        tasks.router,
    ):
        api.include_router(module_router)
    app.include_router(api)
    web.mount(app)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(ServerTiming)
    return app


class ServerTiming:
    """Adds ``Server-Timing: app;dur=<ms>`` (W3C Server Timing) to every HTTP response: the
    milliseconds from the request's arrival to its response head, handler and database
    included, network excluded. Clients and benchmarks read the server's share from it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - start) * 1000
                header = (b"server-timing", f"app;dur={took:.2f}".encode())
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, timed_send)
