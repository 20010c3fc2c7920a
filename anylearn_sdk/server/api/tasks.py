"""Train tasks: create (idempotent), list, get, cancel, logs, results."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from anylearn_sdk.protocol import check_relative_path, manifest_checksum
from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.api.accounts import owned_project
from anylearn_sdk.server.api.algorithms import owned_algorithm
from anylearn_sdk.server.api.resources import (
    add_refs,
    live_version,
    new_version,
    owned_resource,
    resource_json,
)
from anylearn_sdk.server.api.runtime import Amounts
from anylearn_sdk.server.context import DB, ApiError, Ctx, CurrentUser, bad_request, not_found
from anylearn_sdk.server.db import (
    Mirror,
    Project,
    QuotaGroup,
    Resource,
    TrainTask,
    User,
    as_utc,
    iso,
)
from anylearn_sdk.server.scheduler import RESOURCE_KEYS, TaskPaths, fits
from anylearn_sdk.states import ErrorCode, ResourceState, TaskState

router = APIRouter(prefix="/train-tasks", tags=["train tasks"])
LOG_CHUNK_BYTES = 1024 * 1024
HyperValue = str | int | float | bool | None


class Mount(BaseModel):
    ids: list[str] = Field(default_factory=list)
    hyperparam_name: str | None = None


class Mounts(BaseModel):
    dataset: Mount = Mount()
    model: Mount = Mount()
    pretrain: Mount = Mount()


class NewTask(BaseModel):
    name: str | None = Field(default=None, max_length=200)
    description: str = ""
    project_id: str | None = None
    algorithm_id: str
    commit: str
    entrypoint: str = Field(min_length=1)
    hyperparams: dict[str, HyperValue] = Field(default_factory=dict)
    hyperparams_prefix: str = Field(default="--", max_length=16)
    hyperparams_delimiter: str = Field(default=" ", max_length=16)
    mounts: Mounts = Mounts()
    output: str = "output"
    mirror_id: str
    quota_group_id: str
    request: Amounts | None = None
    num_nodes: int = Field(default=1, ge=1, le=64)
    nproc_per_node: int = Field(default=1, ge=1, le=64)


def task_json(t: TrainTask) -> dict:
    return {
        "id": t.id,
        "name": t.name,
        "description": t.description,
        "state": t.state,
        "project_id": t.project_id,
        "algorithm_id": t.algorithm_id,
        "commit": t.commit,
        "entrypoint": t.entrypoint,
        "hyperparams": t.hyperparams,
        "hyperparams_prefix": t.hyperparams_prefix,
        "hyperparams_delimiter": t.hyperparams_delimiter,
        "mounts": t.mounts,
        "output": t.output,
        "mirror_id": t.mirror_id,
        "quota_group_id": t.quota_group_id,
        "request": t.request,
        "num_nodes": t.num_nodes,
        "nproc_per_node": t.nproc_per_node,
        "command": t.command,
        "exit_code": t.exit_code,
        "attempt": t.attempt,
        "runtime": t.runtime,
        "error": t.error,
        "created_at": iso(t.created_at),
        "started_at": iso(t.started_at),
        "finished_at": iso(t.finished_at),
    }


def owned_task(session: Session, user: User, task_id: str) -> TrainTask:
    task = session.get(TrainTask, task_id)
    if task is None or task.owner_id != user.id:
        raise not_found("train task", task_id)
    return task


def _validate(body: NewTask, user: User, session: Session, ctx) -> tuple[dict, str, Project]:
    """Check every reference before anything is written; returns (request, output, project)."""
    try:
        output = check_relative_path(body.output, what="output")
    except ValueError as err:
        raise bad_request(str(err)) from err
    project = owned_project(session, user, body.project_id)
    alg = owned_algorithm(session, user, body.algorithm_id)
    if not gitrepos.has_commit(ctx.paths.repo(alg.id), body.commit):
        raise bad_request(f"commit {body.commit!r} is not in algorithm {alg.id}; push it first")
    for kind in ("dataset", "model"):
        for ref in getattr(body.mounts, kind).ids:
            res = owned_resource(session, user, kind, ref)
            if res.state != ResourceState.READY:
                raise bad_request(f"{kind} {ref} is {res.state}, not READY")
    for ref in body.mounts.pretrain.ids:
        earlier = owned_task(session, user, ref)
        if earlier.state != TaskState.SUCCEEDED:
            raise bad_request(f"pretrain task {ref} is {earlier.state}, not SUCCEEDED")
    if session.get(Mirror, body.mirror_id) is None:
        raise not_found("mirror", body.mirror_id)
    group = session.get(QuotaGroup, body.quota_group_id)
    if group is None:
        raise not_found("quota group", body.quota_group_id)
    request = body.request.model_dump() if body.request else dict(group.default_request)
    if not fits(request, {}, group.capacity):
        wanted = ", ".join(f"{k}={request.get(k, 0)}" for k in RESOURCE_KEYS)
        have = ", ".join(f"{k}={group.capacity.get(k, 0)}" for k in RESOURCE_KEYS)
        raise ApiError(
            400,
            ErrorCode.QUOTA_EXCEEDED,
            f"request ({wanted}) exceeds quota group {group.name!r} capacity ({have})",
        )
    return request, output, project


@router.post("", status_code=201)
def create_task(
    body: NewTask,
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    response: Response,
    idempotency_key: str | None = Header(default=None, max_length=100),
) -> dict:
    """Create a train task. A repeated ``Idempotency-Key`` returns the first task (200)."""
    if idempotency_key:
        existing = session.scalar(
            select(TrainTask).where(
                TrainTask.owner_id == user.id, TrainTask.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            response.status_code = 200
            return task_json(existing)
    request, output, project = _validate(body, user, session, ctx)
    task = TrainTask(
        owner_id=user.id,
        project_id=project.id,
        idempotency_key=idempotency_key,
        name=body.name or body.entrypoint.split()[-1][:200],
        description=body.description,
        algorithm_id=body.algorithm_id,
        commit=body.commit,
        entrypoint=body.entrypoint,
        hyperparams=body.hyperparams,
        hyperparams_prefix=body.hyperparams_prefix,
        hyperparams_delimiter=body.hyperparams_delimiter,
        mounts=body.mounts.model_dump(),
        output=output,
        mirror_id=body.mirror_id,
        quota_group_id=body.quota_group_id,
        request=request,
        num_nodes=body.num_nodes,
        nproc_per_node=body.nproc_per_node,
        state=TaskState.QUEUED.value,
    )
    session.add(task)
    session.commit()
    ctx.scheduler.wake()
    return task_json(task)


#: Bytes read from the end of a log for its last line in the summary listing.
LAST_LINE_WINDOW = 4096
LAST_LINE_CHARS = 200


def last_line(path: os.PathLike) -> str:
    """The last non-empty line of the file at ``path`` (at most 200 characters), or ""."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - LAST_LINE_WINDOW))
            tail = f.read()
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        text = line.decode(errors="replace").strip()
        if text:
            return text[:LAST_LINE_CHARS]
    return ""


@router.get("")
def list_tasks(
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    ids: str | None = None,
    state: str | None = None,
    created_from: datetime | None = None,
    limit: int = Query(default=1000, ge=1, le=10_000),
    view: Literal["full", "summary"] = "full",
) -> Response:
    """The user's newest ``limit`` tasks, oldest first.

    Filters: ``ids`` (comma-separated, at most 900), ``state`` (comma-separated states),
    ``created_from`` (ISO 8601; tasks created then or later). ``view=summary`` gives what a
    live table needs and nothing more: id, name, state, quota_group (its name), attempt,
    exit_code, the timestamps, and ``last_line`` (the log's last non-empty line). One query,
    serialized without FastAPI's encoder, so a watch of 1000 tasks stays cheap.
    """
    if view == "full":
        query = select(TrainTask).where(TrainTask.owner_id == user.id)
    else:
        query = (
            select(*SUMMARY_COLUMNS)
            .join(QuotaGroup, QuotaGroup.id == TrainTask.quota_group_id)
            .where(TrainTask.owner_id == user.id)
        )
    if ids:
        query = query.where(TrainTask.id.in_(ids.split(",")[:900]))
    if state:
        states = state.split(",")
        unknown = sorted(set(states) - {s.value for s in TaskState})
        if unknown:
            raise bad_request(f"state {unknown[0]!r} unknown; use {', '.join(TaskState)}")
        query = query.where(TrainTask.state.in_(states))
    if created_from is not None:
        since = created_from.astimezone(UTC) if created_from.tzinfo else as_utc(created_from)
        query = query.where(TrainTask.created_at >= since)
    query = query.order_by(TrainTask.created_at.desc(), TrainTask.id.desc()).limit(limit)
    if view == "full":
        rows = [task_json(t) for t in session.scalars(query)]
    else:
        rows = _summaries(session.execute(query), ctx.paths.tasks)
    rows.reverse()
    return Response(json.dumps(rows), media_type="application/json")


SUMMARY_COLUMNS = (
    TrainTask.id,
    TrainTask.name,
    TrainTask.state,
    QuotaGroup.name.label("quota_group"),
    TrainTask.attempt,
    TrainTask.exit_code,
    TrainTask.created_at,
    TrainTask.started_at,
    TrainTask.finished_at,
)


def _summaries(rows, tasks_root: Path) -> list[dict]:
    """Summary dicts; only folders that exist are looked into for a log (a task that never
    started has none), so a long queue costs one directory listing."""
    root = str(tasks_root)
    with os.scandir(root) as entries:
        started = {entry.name for entry in entries}
    out = []
    for row in rows:
        summary = row._asdict()
        for key in ("created_at", "started_at", "finished_at"):
            summary[key] = iso(summary[key])
        summary["last_line"] = (
            last_line(os.path.join(root, row.id, TaskPaths.LOG_NAME)) if row.id in started else ""
        )
        out.append(summary)
    return out


@router.get("/{task_id}")
def get_task(task_id: str, user: CurrentUser, session: DB) -> dict:
    """The task's whole record, with ``inputs``: each mount's kind and id, and for datasets
    and models their name, checksum, file count and size in bytes."""
    task = owned_task(session, user, task_id)
    inputs = []
    for kind in ("dataset", "model", "pretrain"):
        for ref in (task.mounts.get(kind) or {}).get("ids") or []:
            entry = {"kind": kind, "id": ref}
            res = session.get(Resource, ref) if kind != "pretrain" else None
            if res is not None:
                entry.update(
                    name=res.name,
                    checksum=res.checksum,
                    file_count=res.file_count,
                    total_bytes=res.total_bytes,
                )
            inputs.append(entry)
    return {**task_json(task), "inputs": inputs}


@router.post("/{task_id}/cancel")
def cancel_task(task_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> dict:
    """Cancel a queued or running task; a terminal task is returned unchanged."""
    task = owned_task(session, user, task_id)
    ctx.scheduler.cancel(task.id)
    session.refresh(task)
    return task_json(task)


@router.get("/{task_id}/logs")
def task_logs(task_id: str, user: CurrentUser, session: DB, ctx: Ctx, offset: int = 0) -> Response:
    """Log bytes from ``offset``; ``X-Anylearn-Next-Offset`` says where to continue.

    ``X-Anylearn-Task-State`` carries the task's state, read before the bytes: when it is
    terminal the log is complete once the next offset stops moving.
    """
    task = owned_task(session, user, task_id)
    if offset < 0:
        raise bad_request(f"offset {offset} is negative")
    state = task.state
    path = TaskPaths(ctx.paths.tasks, task).log
    data = b""
    if path.exists():
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(LOG_CHUNK_BYTES)
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={"X-Anylearn-Next-Offset": str(offset + len(data)), "X-Anylearn-Task-State": state},
    )


class NewModelFromResults(BaseModel):
    name: str | None = Field(default=None, max_length=200)
    project_id: str | None = None


@router.post("/{task_id}/register-model")
def register_model(
    task_id: str,
    body: NewModelFromResults,
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    response: Response,
) -> dict:
    """Register a SUCCEEDED task's results (its output folder) as a model version.

    Every regular file is copied into the object store and hashed on the way, so the model
    stays as it is whatever later happens to the task's folder; symbolic links and special
    files are skipped and listed in ``skipped``. Idempotent on content: results equal to a
    model the user has answer that model (200) instead of a new one (201). The model belongs
    to ``project_id`` (default: the task's project) and is named ``name`` (default: the task's
    name).
    """
    task = owned_task(session, user, task_id)
    if task.state != TaskState.SUCCEEDED:
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            f"task {task.id} is {task.state}; only a SUCCEEDED task's results become a model",
        )
    project = owned_project(session, user, body.project_id or task.project_id)
    output = TaskPaths(ctx.paths.tasks, task).output
    if not output.is_dir():
        raise ApiError(409, ErrorCode.CONFLICT, f"the results of task {task.id} are gone")
    try:
        entries, skipped = ctx.objects.store_tree(output)
    except ValueError as err:
        raise bad_request(f"results of task {task.id}: {err}") from err
    checksum = manifest_checksum(entries)
    model = live_version(session, user, "model", checksum)
    response.status_code = 200
    if model is None:
        name = body.name or task.name
        model = new_version(
            session, "model", user, project, name, checksum, entries, ResourceState.READY
        )
        response.status_code = 201
    add_refs(session, user.id, (e.sha256 for e in entries))
    session.commit()
    return {**resource_json(model), "skipped": skipped, "task_id": task.id}


@router.get("/{task_id}/results")
def task_results(task_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> FileResponse:
    """The task's output folder as an uncompressed tar (members relative to the folder)."""
    task = owned_task(session, user, task_id)
    output = TaskPaths(ctx.paths.tasks, task).output
    if not output.is_dir():
        raise not_found("results of train task", task_id)
    fd, name = tempfile.mkstemp(suffix=".tar")
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for entry in sorted(output.rglob("*")):
            if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
                continue
            tar.add(entry, arcname=str(entry.relative_to(output)), recursive=False)
    return FileResponse(
        name,
        media_type="application/x-tar",
        filename=f"{task.id}-results.tar",
        background=BackgroundTask(os.unlink, name),
    )
