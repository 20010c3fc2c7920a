"""Algorithms: a bare git repository each, pushed to over git smart HTTP.

``/algorithms/{id}/git/...`` is the repository URL a git client pushes to, with the bearer
token in an ``Authorization`` header (``http.extraHeader``), never in the URL.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.api.accounts import owned_project
from anylearn_sdk.server.context import DB, Ctx, CurrentUser, conflict, not_found
from anylearn_sdk.server.db import Algorithm, User
from anylearn_sdk.wire import API_PREFIX, AlgorithmRecord, CommitRecord, NewAlgorithm

router = APIRouter(tags=["algorithms"])
GIT_SERVICES = {"info/refs", "git-upload-pack", "git-receive-pack"}


def algorithm_record(alg: Algorithm) -> AlgorithmRecord:
    return AlgorithmRecord(
        id=alg.id,
        name=alg.name,
        project_id=alg.project_id,
        created_at=alg.created_at,
        git_path=f"{API_PREFIX}/algorithms/{alg.id}/git",
    )


def owned_algorithm(session: Session, user: User, algorithm_id: str) -> Algorithm:
    alg = session.get(Algorithm, algorithm_id)
    if alg is None or alg.owner_id != user.id:
        raise not_found("algorithm", algorithm_id)
    return alg


@router.get("/algorithms", response_model=list[AlgorithmRecord])
def list_algorithms(
    user: CurrentUser, session: DB, name: str | None = None
) -> list[AlgorithmRecord]:
    query = select(Algorithm).where(Algorithm.owner_id == user.id).order_by(Algorithm.created_at)
    if name is not None:
        query = query.where(Algorithm.name == name)
    return [algorithm_record(a) for a in session.scalars(query)]


@router.post("/algorithms", status_code=201, response_model=AlgorithmRecord)
def create_algorithm(
    body: NewAlgorithm, user: CurrentUser, session: DB, ctx: Ctx
) -> AlgorithmRecord:
    """Create an algorithm and its empty bare repository."""
    project = owned_project(session, user, body.project_id)
    exists = session.scalar(
        select(Algorithm).where(Algorithm.owner_id == user.id, Algorithm.name == body.name)
    )
    if exists is not None:
        raise conflict(f"algorithm {body.name!r} already exists")
    alg = Algorithm(owner_id=user.id, project_id=project.id, name=body.name)
    session.add(alg)
    session.flush()
    gitrepos.init_bare(ctx.paths.repo(alg.id))
    session.commit()
    return algorithm_record(alg)


@router.get("/algorithms/{algorithm_id}", response_model=AlgorithmRecord)
def get_algorithm(algorithm_id: str, user: CurrentUser, session: DB) -> AlgorithmRecord:
    return algorithm_record(owned_algorithm(session, user, algorithm_id))


@router.get("/algorithms/{algorithm_id}/commits/{sha}", response_model=CommitRecord)
def get_commit(
    algorithm_id: str, sha: str, user: CurrentUser, session: DB, ctx: Ctx
) -> CommitRecord:
    """200 if the repository holds commit ``sha`` (full hex), else 404."""
    alg = owned_algorithm(session, user, algorithm_id)
    if not gitrepos.has_commit(ctx.paths.repo(alg.id), sha):
        raise not_found("commit", sha)
    return CommitRecord(algorithm_id=alg.id, sha=sha)


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


for _method in ("GET", "POST"):
    router.add_api_route(
        "/algorithms/{algorithm_id}/git/{service:path}",
        git_smart_http,
        methods=[_method],
        name=f"git_smart_http_{_method.lower()}",
        operation_id=f"git_smart_http_{_method.lower()}",
    )
