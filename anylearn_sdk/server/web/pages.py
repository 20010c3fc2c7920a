"""The backend's own web page: tasks, live logs, metric charts, comparison, data and quotas.

Server-rendered Jinja2 templates (autoescaped: every name, log line and parameter is text),
htmx for the parts that refresh (the task table), a small script of our own for the log and
the charts (uPlot), all served from ``/static``; nothing is loaded from another origin.

Security, by construction:

* Sign-in (username and password, or an API token) creates a web session: a token of its own
  (:data:`SESSION_TOKEN_NAME`, :data:`SESSION_SECONDS`), held in a cookie that is
  ``HttpOnly``, ``SameSite=Strict`` and ``Secure`` over TLS. Sign-out deletes that token, so
  the cookie is dead everywhere at once. No token ever appears in a URL.
* Every state-changing request is a POST that carries the session's CSRF value (derived from
  the session token, checked in constant time) and, when the browser sends one, an ``Origin``
  of this host.
* ``Content-Security-Policy`` forbids inline script and any other origin, on every response
  (:class:`SecurityHeaders`).
* A user sees only their own tasks, data and logs (another's is 404, as in the API); an admin
  sees everyone's, each page saying so.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anylearn_sdk.compare import compare as compare_records
from anylearn_sdk.server import records
from anylearn_sdk.server.api.accounts import authenticate, issue_token
from anylearn_sdk.server.api.runtime import group_usage, quota_group_record
from anylearn_sdk.server.api.tasks import last_line, log_chunk
from anylearn_sdk.server.context import (
    ApiError,
    ServerContext,
    get_context,
    get_session,
    hash_token,
    user_for_token,
)
from anylearn_sdk.server.db import QuotaGroup, Resource, Token, TrainTask, User, as_utc
from anylearn_sdk.server.workspace import TaskPaths
from anylearn_sdk.states import TaskState
from anylearn_sdk.wire import NEXT_OFFSET_HEADER, TASK_STATE_HEADER

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "anylearn_session"
SESSION_TOKEN_NAME = "web session"  # noqa: S105 - a label, not a secret
#: Seconds a web session lives.
SESSION_SECONDS = 7 * 86400
#: Tasks per page of the task list.
PAGE_SIZE = 50
#: On every response: no inline script, nothing from another origin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

templates = Jinja2Templates(directory=str(HERE / "templates"))


class SignInNeeded(Exception):
    """No valid web session: pages redirect to the sign-in page, fragments answer 401."""


class PageError(Exception):
    """An error shown as a page: ``status`` (404 for what the user may not see) and a
    one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class SecurityHeaders:
    """Adds the CSP and its companions to every HTTP response."""

    HEADERS = (
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


# sessions ---------------------------------------------------------------------------------
def csrf_value(session_token: str) -> str:
    """The CSRF value of a session: derived from its secret, so it needs no storage."""
    return hmac.new(session_token.encode(), b"anylearn-csrf", hashlib.sha256).hexdigest()


def web_user(request: Request, session: Annotated[Session, Depends(get_session)]) -> User:
    """The signed-in user of this request's session cookie; :class:`SignInNeeded` if none."""
    token = request.cookies.get(SESSION_COOKIE, "")
    if not token:
        raise SignInNeeded
    try:
        user = user_for_token(session, token, request)
    except ApiError:
        raise SignInNeeded from None
    request.state.csrf = csrf_value(token)
    return user


WebUser = Annotated[User, Depends(web_user)]
DB = Annotated[Session, Depends(get_session)]
Ctx = Annotated[ServerContext, Depends(get_context)]


def check_post(request: Request, csrf: str) -> None:
    """Refuse a state-changing request without this session's CSRF value, or from another
    origin (403)."""
    token = request.cookies.get(SESSION_COOKIE, "")
    expected = csrf_value(token) if token else ""
    if not expected or not hmac.compare_digest(expected, csrf):
        raise PageError(403, "this form is stale or not from this site; reload the page")
    _check_origin(request)


def _check_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.url.netloc:
        raise PageError(403, f"a request from {origin} is not accepted")


def render(request: Request, name: str, user: User | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "csrf": getattr(request.state, "csrf", ""), **context},
    )


def visible_task(session: Session, user: User, task_id: str) -> TrainTask:
    """The task if ``user`` may see it (theirs, or any for an admin); else 404."""
    task = session.get(TrainTask, task_id)
    if task is None or (task.owner_id != user.id and not user.is_admin):
        raise PageError(404, f"train task {task_id!r} not found")
    return task


def _safe_next(target: str | None) -> str:
    """A local path to go to after sign-in (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/tasks"
    return target


# jinja helpers ----------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _elapsed(task: Any) -> str:
    if task.started_at is None:
        return "-"
    end = task.finished_at or datetime.now(UTC)
    seconds = max(0, int((as_utc(end) - as_utc(task.started_at)).total_seconds()))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


templates.env.filters["size"] = _size
templates.env.filters["when"] = _when
templates.env.globals["elapsed"] = _elapsed
templates.env.globals["TaskState"] = TaskState


# routes -----------------------------------------------------------------------------------
router = APIRouter(include_in_schema=False)


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/tasks", status_code=303)


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request, next: str | None = None, error: str = "") -> HTMLResponse:  # noqa: A002
    return render(request, "signin.html", None, next=_safe_next(next), error=error)


@router.post("/signin")
def signin(
    request: Request,
    session: DB,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/tasks",  # noqa: A002
) -> Response:
    """Sign in with a username and password, or with an API token; either way a new web
    session token is issued and set as the cookie (the API token itself never is)."""
    _check_origin(request)
    user: User | None = None
    if token:
        try:
            user = user_for_token(session, token.strip(), request)
        except ApiError:
            user = None
    elif username:
        user = authenticate(session, username, password)
    if user is None:
        target = f"/signin?error=1&next={quote(_safe_next(next))}"
        return RedirectResponse(target, status_code=303)
    secret, _ = issue_token(session, user, SESSION_TOKEN_NAME, SESSION_SECONDS)
    session.commit()
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/signout")
def signout(request: Request, session: DB, csrf: Annotated[str, Form()] = "") -> Response:
    check_post(request, csrf)
    token = request.cookies.get(SESSION_COOKIE, "")
    session.execute(
        delete(Token).where(
            Token.token_sha256 == hash_token(token), Token.name == SESSION_TOKEN_NAME
        )
    )
    session.commit()
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _task_query(user: User, state: str, q: str):
    query = select(TrainTask, QuotaGroup.name.label("group")).join(
        QuotaGroup, QuotaGroup.id == TrainTask.quota_group_id
    )
    if not user.is_admin:
        query = query.where(TrainTask.owner_id == user.id)
    if state:
        query = query.where(TrainTask.state == state)
    if q:
        like = f"%{q}%"
        fields = (TrainTask.name, TrainTask.id, TrainTask.entrypoint)
        query = query.where(or_(*(f.ilike(like) for f in fields)))
    return query


def _rows(session: Session, ctx: ServerContext, user: User, state: str, q: str, page: int):
    """One page of the task list, newest first: (rows, pages)."""
    query = _task_query(user, state, q)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(max(1, page), pages)
    found = session.execute(
        query.order_by(TrainTask.created_at.desc(), TrainTask.id.desc())
        .offset((page - 1) * PAGE_SIZE)
        .limit(PAGE_SIZE)
    ).all()
    owners = _owners(session, {task.owner_id for task, _ in found}) if user.is_admin else {}
    rows = []
    for task, group in found:
        started = task.started_at is not None
        log = TaskPaths.of(ctx.paths.tasks, task).log
        rows.append(
            {
                "task": task,
                "group": group,
                "owner": owners.get(task.owner_id, ""),
                "last": task.error
                if task.state in (TaskState.FAILED, TaskState.CANCELLED) and task.error
                else (last_line(log) if started else ""),
            }
        )
    return rows, page, pages, total


@dataclass(frozen=True)
class TaskFilter:
    """The task list's query: a state (or every state), text in the name, id or entrypoint,
    and the page (1 is the newest)."""

    state: str = Query(default="", max_length=20)
    q: str = Query(default="", max_length=200)
    page: int = Query(default=1, ge=1, le=10**6)


Filter = Annotated[TaskFilter, Depends()]


@router.get("/tasks", response_class=HTMLResponse)
def tasks_page(request: Request, user: WebUser, session: DB, ctx: Ctx, f: Filter) -> HTMLResponse:
    rows, page, pages, total = _rows(session, ctx, user, _state(f.state), f.q, f.page)
    return render(
        request, "tasks.html", user, rows=rows, state=f.state, q=f.q, page=page, pages=pages,
        total=total, states=[s.value for s in TaskState],
    )  # fmt: skip


@router.get("/tasks/rows", response_class=HTMLResponse)
def task_rows(request: Request, user: WebUser, session: DB, ctx: Ctx, f: Filter) -> HTMLResponse:
    """The task table's body, for htmx to swap in every few seconds."""
    rows, *_ = _rows(session, ctx, user, _state(f.state), f.q, f.page)
    return render(request, "_task_rows.html", user, rows=rows)


def _state(state: str) -> str:
    if state and state not in {s.value for s in TaskState}:
        raise PageError(400, f"state {state!r} unknown")
    return state


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task_page(request: Request, task_id: str, user: WebUser, session: DB, ctx: Ctx) -> HTMLResponse:
    task = visible_task(session, user, task_id)
    record = _record(session, ctx, task)
    owner = session.get(User, task.owner_id) if task.owner_id != user.id else None
    return render(request, "task.html", user, task=task, record=record, owner=owner)


@router.get("/tasks/{task_id}/log")
def task_log(
    task_id: str,
    user: WebUser,
    session: DB,
    ctx: Ctx,
    offset: int = Query(default=0, ge=0, le=2**62),
) -> Response:
    """Log bytes from ``offset`` (as the API's ``/logs``), for the page's log follower."""
    task = visible_task(session, user, task_id)
    data = log_chunk(TaskPaths.of(ctx.paths.tasks, task).log, offset)
    return Response(
        data,
        media_type="text/plain; charset=utf-8",
        headers={NEXT_OFFSET_HEADER: str(offset + len(data)), TASK_STATE_HEADER: task.state},
    )


@router.get("/tasks/{task_id}/metrics")
def task_metrics(task_id: str, user: WebUser, session: DB, ctx: Ctx) -> JSONResponse:
    task = visible_task(session, user, task_id)
    series, _, _ = records.results(TaskPaths.of(ctx.paths.tasks, task))
    body = {k: v.model_dump(mode="json") for k, v in series.items()}
    return JSONResponse({"state": task.state, "series": body})


@router.get("/tasks/{task_id}/files/{path:path}")
def task_file(task_id: str, path: str, user: WebUser, session: DB, ctx: Ctx) -> FileResponse:
    """One output file (a regular file inside the output folder; no link is followed)."""
    task = visible_task(session, user, task_id)
    output = TaskPaths.of(ctx.paths.tasks, task).output
    relative = Path(path)
    if relative.is_absolute() or ".." in relative.parts:
        raise PageError(404, f"output file {path!r} not found")
    target = output / relative
    try:
        inside = target.resolve(strict=True).is_relative_to(output.resolve(strict=True))
    except (OSError, RuntimeError):
        inside = False
    if not inside or not target.is_file() or _has_link(output, target):
        raise PageError(404, f"output file {path!r} not found")
    return FileResponse(target, filename=target.name, media_type="application/octet-stream")


def _record(session: Session, ctx: ServerContext, task: TrainTask):
    paths = ctx.paths
    return records.experiment_record(
        session, task, repos_root=paths.repos, tasks_root=paths.tasks, backend=ctx.server_id
    )


def _has_link(root: Path, target: Path) -> bool:
    current = target
    while current != root and current != current.parent:
        if current.is_symlink():
            return True
        current = current.parent
    return False


@router.post("/tasks/{task_id}/cancel")
def cancel(
    request: Request, task_id: str, user: WebUser, session: DB, ctx: Ctx,
    csrf: Annotated[str, Form()] = "",
) -> RedirectResponse:  # fmt: skip
    check_post(request, csrf)
    task = visible_task(session, user, task_id)
    ctx.scheduler.cancel(task.id)
    return RedirectResponse(f"/tasks/{task.id}", status_code=303)


@router.post("/tasks/{task_id}/register-model")
def register_model(
    request: Request, task_id: str, user: WebUser, session: DB, ctx: Ctx,
    csrf: Annotated[str, Form()] = "",
) -> RedirectResponse:  # fmt: skip
    from anylearn_sdk.server.api.tasks import register_model as register
    from anylearn_sdk.wire import NewModelFromResults

    check_post(request, csrf)
    task = visible_task(session, user, task_id)
    owner = session.get(User, task.owner_id)
    try:
        model = register(task.id, NewModelFromResults(), owner, session, ctx, Response())
    except ApiError as err:
        raise PageError(err.status, err.message) from None
    return RedirectResponse(f"/models?registered={model.id}", status_code=303)


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    user: WebUser,
    session: DB,
    ctx: Ctx,
    ids: list[str] = Query(default=[], max_length=20),
) -> HTMLResponse:
    tasks = [visible_task(session, user, i) for i in dict.fromkeys(ids)]
    error = "" if len(tasks) >= 2 else "pick two or more tasks in the task list"
    recs = [_record(session, ctx, t) for t in tasks]
    rows = compare_records(recs) if len(recs) >= 2 else []
    keys = sorted({k for r in recs for k in r.results.metrics})
    return render(request, "compare.html", user, records=recs, rows=rows, keys=keys, error=error)


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, user: WebUser, session: DB) -> HTMLResponse:
    return _resources(request, user, session, "dataset", "")


@router.get("/models", response_class=HTMLResponse)
def models_page(
    request: Request, user: WebUser, session: DB, registered: str = Query(default="", max_length=40)
) -> HTMLResponse:
    return _resources(request, user, session, "model", registered)


def _resources(request: Request, user: User, session: Session, kind: str, registered: str):
    query = select(Resource).where(Resource.kind == kind)
    if not user.is_admin:
        query = query.where(Resource.owner_id == user.id)
    rows = session.scalars(query.order_by(Resource.created_at.desc()).limit(1000)).all()
    owners = _owners(session, {r.owner_id for r in rows}) if user.is_admin else {}
    return render(
        request, "resources.html", user, kind=kind, rows=rows, owners=owners, registered=registered
    )


def _owners(session: Session, ids: set[str]) -> dict[str, str]:
    """Usernames by user id, for the owner column an admin sees."""
    return dict(session.execute(select(User.id, User.username).where(User.id.in_(ids))).all())


@router.get("/quota", response_class=HTMLResponse)
def quota_page(request: Request, user: WebUser, session: DB) -> HTMLResponse:
    usage = group_usage(session)
    groups = session.scalars(
        select(QuotaGroup).where(QuotaGroup.deleted.is_(False)).order_by(QuotaGroup.name)
    ).all()
    rows = [quota_group_record(g, usage.get(g.id)) for g in groups]
    return render(request, "quota.html", user, rows=rows)


def mount(app: Any) -> None:
    """Add the pages, ``/static`` and the sign-in redirect to ``app``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, _exc: SignInNeeded) -> Response:
        wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
        if wants_page and "hx-request" not in request.headers:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/signin?next={quote(target)}", status_code=303)
        return JSONResponse({"error": {"code": "unauthenticated", "message": "sign in"}}, 401)

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError) -> Response:
        user = None
        response = render(request, "error.html", user, status=exc.status, message=exc.message)
        response.status_code = exc.status
        return response
