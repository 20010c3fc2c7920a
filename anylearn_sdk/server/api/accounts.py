"""Users, tokens and projects: ``/auth/login``, ``/users``, ``/tokens``, ``/projects``."""

from __future__ import annotations

import secrets
import shutil
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import APIRouter, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from anylearn_sdk.server.context import (
    DB,
    AdminUser,
    ApiError,
    Ctx,
    CurrentUser,
    bad_request,
    conflict,
    hash_token,
    not_found,
)
from anylearn_sdk.server.db import (
    Algorithm,
    MissingObject,
    ObjectRef,
    Project,
    Resource,
    Token,
    TrainTask,
    Upload,
    User,
    utcnow,
)
from anylearn_sdk.states import TERMINAL_TASK_STATES, ErrorCode
from anylearn_sdk.wire import (
    LoginBody,
    LoginResult,
    NewProject,
    NewToken,
    NewTokenResult,
    NewUser,
    ProjectRecord,
    TokenRecord,
    UserRecord,
)

router = APIRouter()
_hasher = PasswordHasher()
#: Hash verified against when the username does not exist, so timing does not reveal users.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
DEFAULT_PROJECT_NAME = "default"
#: Name of the tokens ``/auth/login`` hands out.
LOGIN_TOKEN_NAME = "login"  # noqa: S105 - a label, not a secret


def user_record(user: User) -> UserRecord:
    return UserRecord.model_validate(user, from_attributes=True)


def project_record(project: Project) -> ProjectRecord:
    return ProjectRecord.model_validate(project, from_attributes=True)


def token_record(token: Token) -> TokenRecord:
    return TokenRecord.model_validate(token, from_attributes=True)


def create_user(session: Session, username: str, password: str, *, is_admin: bool) -> User:
    """Create a user with its default project. The caller commits."""
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise conflict(f"user {username!r} already exists")
    user = User(username=username, password_hash=_hasher.hash(password), is_admin=is_admin)
    session.add(user)
    session.flush()
    session.add(Project(owner_id=user.id, name=DEFAULT_PROJECT_NAME, is_default=True))
    return user


def issue_token(
    session: Session, user: User, name: str = "", expires_in: int | None = None
) -> tuple[str, Token]:
    """Create a new API token for ``user`` (valid ``expires_in`` seconds, or for ever); only
    its sha256 is stored. Returns the secret and the row. The caller commits."""
    secret = "al_" + secrets.token_urlsafe(32)
    expires_at = utcnow() + timedelta(seconds=expires_in) if expires_in else None
    row = Token(user_id=user.id, token_sha256=hash_token(secret), name=name, expires_at=expires_at)
    session.add(row)
    session.flush()
    return secret, row


def issue_task_token(session: Session, task: TrainTask) -> str:
    """A token of ``task``'s owner scoped to that task (its code and data, while it is QUEUED
    or RUNNING; see :func:`~anylearn_sdk.server.context.check_task_scope`). The caller
    commits; :func:`revoke_task_tokens` removes it when the task ends."""
    secret = "al_" + secrets.token_urlsafe(32)
    session.add(
        Token(
            user_id=task.owner_id,
            token_sha256=hash_token(secret),
            name=f"task {task.id}",
            task_id=task.id,
        )
    )
    return secret


def revoke_task_tokens(session: Session, task_id: str) -> None:
    session.execute(delete(Token).where(Token.task_id == task_id))


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The user whose password this is, or None. An unknown username costs a hash check as
    well, so timing does not tell which usernames exist."""
    user = session.scalar(select(User).where(User.username == username))
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except VerificationError:
        return None
    return user


@router.post("/auth/login", tags=["auth"], response_model=LoginResult)
def login(body: LoginBody, session: DB) -> LoginResult:
    """Exchange a username and password for a new bearer token."""
    user = authenticate(session, body.username, body.password)
    if user is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "wrong username or password")
    secret, _ = issue_token(session, user, LOGIN_TOKEN_NAME)
    session.commit()
    return LoginResult(token=secret, user=user_record(user))


@router.get("/users/me", tags=["auth"], response_model=UserRecord)
def me(user: CurrentUser) -> UserRecord:
    return user_record(user)


@router.get("/users", tags=["users"], response_model=list[UserRecord])
def list_users(_admin: AdminUser, session: DB) -> list[UserRecord]:
    """Every user, oldest first (admin only)."""
    return [user_record(u) for u in session.scalars(select(User).order_by(User.created_at))]


@router.post("/users", status_code=201, tags=["users"], response_model=UserRecord)
def add_user(body: NewUser, _admin: AdminUser, session: DB) -> UserRecord:
    """Create a user (admin only). The new user gets a default project."""
    user = create_user(session, body.username, body.password, is_admin=body.is_admin)
    session.commit()
    return user_record(user)


@router.delete("/users/{username}", status_code=204, tags=["users"])
def remove_user(username: str, admin: AdminUser, session: DB, ctx: Ctx) -> Response:
    """Remove a user and everything they own: tokens, projects, algorithms and their
    repositories, dataset and model versions, finished tasks and their folders (admin only).

    Stored objects stay for the other users who hold them. Refused (409) while one of the
    user's tasks is queued or running, and for the calling admin themselves.
    """
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise not_found("user", username)
    if user.id == admin.id:
        raise bad_request("an admin cannot remove themselves; ask another admin")
    live = session.scalars(
        select(TrainTask.id).where(
            TrainTask.owner_id == user.id, TrainTask.state.not_in(list(TERMINAL_TASK_STATES))
        )
    ).all()
    if live:
        raise conflict(
            f"user {username!r} has {len(live)} queued or running task(s) ({live[0]}, ...); "
            "cancel them first"
        )
    task_ids = session.scalars(select(TrainTask.id).where(TrainTask.owner_id == user.id)).all()
    alg_ids = session.scalars(select(Algorithm.id).where(Algorithm.owner_id == user.id)).all()
    upload_ids = session.scalars(select(Upload.id).where(Upload.owner_id == user.id)).all()
    resource_ids = session.scalars(select(Resource.id).where(Resource.owner_id == user.id)).all()
    session.execute(
        delete(MissingObject).where(
            MissingObject.resource_id.in_(select(Resource.id).where(Resource.owner_id == user.id))
        )
    )
    for model in (Upload, ObjectRef, TrainTask, Resource, Algorithm, Project, Token):
        column = model.user_id if model is Token else model.owner_id
        session.execute(delete(model).where(column == user.id))
    session.delete(user)
    session.commit()
    for task_id in task_ids:
        shutil.rmtree(ctx.paths.tasks / task_id, ignore_errors=True)
    for alg_id in alg_ids:
        shutil.rmtree(ctx.paths.repo(alg_id), ignore_errors=True)
    for upload_id in upload_ids:
        (ctx.paths.uploads / upload_id).unlink(missing_ok=True)
        (ctx.paths.uploads / f"{upload_id}.members").unlink(missing_ok=True)
    for resource_id in resource_ids:
        shutil.rmtree(ctx.paths.materialized / resource_id, ignore_errors=True)
    return Response(status_code=204)


@router.get("/tokens", tags=["tokens"], response_model=list[TokenRecord])
def list_tokens(user: CurrentUser, session: DB) -> list[TokenRecord]:
    """The calling user's tokens, oldest first, without their secrets (tasks' own tokens,
    which live only while their task runs, are not listed)."""
    rows = session.scalars(
        select(Token).where(Token.user_id == user.id, Token.task_id.is_(None)).order_by(Token.id)
    )
    return [token_record(t) for t in rows]


@router.post("/tokens", status_code=201, tags=["tokens"], response_model=NewTokenResult)
def create_token(body: NewToken, user: CurrentUser, session: DB) -> NewTokenResult:
    """A new token for the calling user; the answer is the only time its secret is shown."""
    secret, row = issue_token(session, user, body.name, body.expires_in)
    session.commit()
    return NewTokenResult(token=secret, **token_record(row).model_dump())


@router.delete("/tokens/{token_id}", status_code=204, tags=["tokens"])
def revoke_token(token_id: int, user: CurrentUser, session: DB) -> Response:
    """Revoke one of the calling user's tokens (the one in use too)."""
    row = session.get(Token, token_id)
    if row is None or row.user_id != user.id:
        raise not_found("token", str(token_id))
    session.delete(row)
    session.commit()
    return Response(status_code=204)


@router.get("/projects", tags=["projects"], response_model=list[ProjectRecord])
async def list_projects(
    user: CurrentUser, session: DB, name: str | None = None
) -> list[ProjectRecord]:
    query = select(Project).where(Project.owner_id == user.id).order_by(Project.created_at)
    if name is not None:
        query = query.where(Project.name == name)
    return [project_record(p) for p in session.scalars(query)]


@router.post("/projects", status_code=201, tags=["projects"], response_model=ProjectRecord)
def create_project(body: NewProject, user: CurrentUser, session: DB) -> ProjectRecord:
    exists = session.scalar(
        select(Project).where(Project.owner_id == user.id, Project.name == body.name)
    )
    if exists is not None:
        raise conflict(f"project {body.name!r} already exists")
    project = Project(owner_id=user.id, name=body.name)
    session.add(project)
    session.commit()
    return project_record(project)


def owned_project(session: Session, user: User, project_id: str | None) -> Project:
    """The user's project ``project_id``, or their default project when it is None."""
    if project_id is None:
        query = select(Project).where(Project.owner_id == user.id, Project.is_default)
    else:
        query = select(Project).where(Project.owner_id == user.id, Project.id == project_id)
    project = session.scalar(query)
    if project is None:
        raise not_found("project", project_id or "default")
    return project


@router.get("/projects/{project_id}", tags=["projects"], response_model=ProjectRecord)
def get_project(project_id: str, user: CurrentUser, session: DB) -> ProjectRecord:
    return project_record(owned_project(session, user, project_id))
