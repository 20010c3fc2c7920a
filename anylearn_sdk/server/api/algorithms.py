"""Algorithms: a bare git repository each, pushed to over git smart HTTP.

``/algorithms/{id}/git/...`` is the repository URL a git client pushes to, with the bearer
token in an ``Authorization`` header (``http.extraHeader``), never in the URL.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.api.accounts import NAME_PATTERN, owned_project
from anylearn_sdk.server.context import DB, ApiError, Ctx, CurrentUser, not_found
from anylearn_sdk.server.db import Algorithm, User, iso
from anylearn_sdk.states import ErrorCode

router = APIRouter(tags=["algorithms"])
GIT_SERVICES = {"info/refs", "git-upload-pack", "git-receive-pack"}


class NewAlgorithm(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    project_id: str | None = None


def algorithm_json(alg: Algorithm) -> dict:
    return {
        "id": alg.id,
        "name": alg.name,
        "project_id": alg.project_id,
        "created_at": iso(alg.created_at),
        "git_path": f"/api/v1/algorithms/{alg.id}/git",
    }


def owned_algorithm(session: Session, user: User, algorithm_id: str) -> Algorithm:
    alg = session.get(Algorithm, algorithm_id)
    if alg is None or alg.owner_id != user.id:
        raise not_found("algorithm", algorithm_id)
    return alg


@router.get("/algorithms")
def list_algorithms(user: CurrentUser, session: DB, name: str | None = None) -> list[dict]:
    query = select(Algorithm).where(Algorithm.owner_id == user.id).order_by(Algorithm.created_at)
    if name is not None:
        query = query.where(Algorithm.name == name)
    return [algorithm_json(a) for a in session.scalars(query)]


@router.post("/algorithms", status_code=201)
def create_algorithm(body: NewAlgorithm, user: CurrentUser, session: DB, ctx: Ctx) -> dict:
    """Create an algorithm and its empty bare repository."""
    project = owned_project(session, user, body.project_id)
    exists = session.scalar(
        select(Algorithm).where(Algorithm.owner_id == user.id, Algorithm.name == body.name)
    )
    if exists is not None:
        raise ApiError(409, ErrorCode.CONFLICT, f"algorithm {body.name!r} already exists")
    alg = Algorithm(owner_id=user.id, project_id=project.id, name=body.name)
    session.add(alg)
    session.flush()
    gitrepos.init_bare(ctx.paths.repo(alg.id))
    session.commit()
    return algorithm_json(alg)


@router.get("/algorithms/{algorithm_id}")
def get_algorithm(algorithm_id: str, user: CurrentUser, session: DB) -> dict:
    return algorithm_json(owned_algorithm(session, user, algorithm_id))


@router.get("/algorithms/{algorithm_id}/commits/{sha}")
def get_commit(algorithm_id: str, sha: str, user: CurrentUser, session: DB, ctx: Ctx) -> dict:
    """200 if the repository holds commit ``sha`` (full hex), else 404."""
    alg = owned_algorithm(session, user, algorithm_id)
    if not gitrepos.has_commit(ctx.paths.repo(alg.id), sha):
        raise not_found("commit", sha)
    return {"algorithm_id": alg.id, "sha": sha}


@router.api_route("/algorithms/{algorithm_id}/git/{service:path}", methods=["GET", "POST"])
async def git_smart_http(
    algorithm_id: str, service: str, request: Request, user: CurrentUser, session: DB, ctx: Ctx
) -> Response:
    """git smart HTTP (git-http-backend(1)) for the algorithm's repository."""
    alg = owned_algorithm(session, user, algorithm_id)
    if service not in GIT_SERVICES:
        raise not_found("git service", service)
    body = await request.body()
    answer = await run_in_threadpool(
        gitrepos.http_backend,
        ctx.paths.repos,
        f"/{alg.id}.git/{service}",
        method=request.method,
        query_string=request.url.query,
        content_type=request.headers.get("content-type"),
        content_encoding=request.headers.get("content-encoding"),
        git_protocol=request.headers.get("git-protocol"),
        remote_user=user.username,
        body=body,
    )
    return Response(content=answer.body, status_code=answer.status, headers=dict(answer.headers))
