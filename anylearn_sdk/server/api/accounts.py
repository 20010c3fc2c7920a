"""Users, tokens and projects: ``/auth/login``, ``/users``, ``/projects``."""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from anylearn_sdk.server.context import DB, AdminUser, ApiError, CurrentUser, hash_token, not_found
from anylearn_sdk.server.db import Project, Token, User, iso
from anylearn_sdk.states import ErrorCode

router = APIRouter()
_hasher = PasswordHasher()
#: Hash verified against when the username does not exist, so timing does not reveal users.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
DEFAULT_PROJECT_NAME = "default"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class LoginBody(BaseModel):
    username: str
    password: str


class NewUser(BaseModel):
    username: str = Field(pattern=NAME_PATTERN)
    password: str = Field(min_length=8)
    is_admin: bool = False


class NewProject(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)


def user_json(user: User) -> dict:
    return {"id": user.id, "username": user.username, "is_admin": user.is_admin}


def project_json(project: Project) -> dict:
    return {
        "id": project.id,
        "name": project.name,
        "is_default": project.is_default,
        "created_at": iso(project.created_at),
    }


def create_user(session: Session, username: str, password: str, *, is_admin: bool) -> User:
    """Create a user with its default project. The caller commits."""
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise ApiError(409, ErrorCode.CONFLICT, f"user {username!r} already exists")
    user = User(username=username, password_hash=_hasher.hash(password), is_admin=is_admin)
    session.add(user)
    session.flush()
    session.add(Project(owner_id=user.id, name=DEFAULT_PROJECT_NAME, is_default=True))
    return user


def issue_token(session: Session, user: User) -> str:
    """Create a new API token for ``user``; only its sha256 is stored. The caller commits."""
    token = "al_" + secrets.token_urlsafe(32)
    session.add(Token(user_id=user.id, token_sha256=hash_token(token)))
    return token


@router.post("/auth/login", tags=["auth"])
def login(body: LoginBody, session: DB) -> dict:
    """Exchange a username and password for a new bearer token."""
    user = session.scalar(select(User).where(User.username == body.username))
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, body.password)
    except VerificationError:
        user = None
    if user is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "wrong username or password")
    token = issue_token(session, user)
    session.commit()
    return {"token": token, "user": user_json(user)}


@router.get("/users/me", tags=["auth"])
def me(user: CurrentUser) -> dict:
    return user_json(user)


@router.post("/users", status_code=201, tags=["auth"])
def add_user(body: NewUser, _admin: AdminUser, session: DB) -> dict:
    """Create a user (admin only). The new user gets a default project."""
    user = create_user(session, body.username, body.password, is_admin=body.is_admin)
    session.commit()
    return user_json(user)


@router.get("/projects", tags=["projects"])
async def list_projects(user: CurrentUser, session: DB, name: str | None = None) -> list[dict]:
    query = select(Project).where(Project.owner_id == user.id).order_by(Project.created_at)
    if name is not None:
        query = query.where(Project.name == name)
    return [project_json(p) for p in session.scalars(query)]


@router.post("/projects", status_code=201, tags=["projects"])
def create_project(body: NewProject, user: CurrentUser, session: DB) -> dict:
    exists = session.scalar(
        select(Project).where(Project.owner_id == user.id, Project.name == body.name)
    )
    if exists is not None:
        raise ApiError(409, ErrorCode.CONFLICT, f"project {body.name!r} already exists")
    project = Project(owner_id=user.id, name=body.name)
    session.add(project)
    session.commit()
    return project_json(project)


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


@router.get("/projects/{project_id}", tags=["projects"])
def get_project(project_id: str, user: CurrentUser, session: DB) -> dict:
    return project_json(owned_project(session, user, project_id))
