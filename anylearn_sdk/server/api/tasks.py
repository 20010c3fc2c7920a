"""Train tasks: create (idempotent), list, get, cancel, logs, results."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from anylearn_sdk.protocol import canonical_rows, check_relative_path
from anylearn_sdk.server import gitrepos, records
from anylearn_sdk.server.api.accounts import owned_project
from anylearn_sdk.server.api.algorithms import owned_algorithm
from anylearn_sdk.server.api.resources import (
    add_refs,
    live_version,
    owned_resource,
    resource_record,
    users_of,
    version_of_rows,
)
from anylearn_sdk.server.api.runtime import live_group
from anylearn_sdk.server.context import (
    DB,
    ApiError,
    Ctx,
    CurrentUser,
    bad_request,
    conflict,
    not_found,
)
from anylearn_sdk.server.db import (
    Mirror,
    Project,
    QuotaGroup,
    TrainTask,
    User,
    as_utc,
)
from anylearn_sdk.server.failures import tail
from anylearn_sdk.server.scheduler import fits, held
from anylearn_sdk.server.workspace import TaskPaths
from anylearn_sdk.states import ErrorCode, ResourceState, TaskState
from anylearn_sdk.wire import (
    IDEMPOTENCY_HEADER,
    LOG_CHUNK_BYTES,
    MAX_LOG_OFFSET,
    NEXT_OFFSET_HEADER,
    RESOURCE_KEYS,
    REUSED_HEADER,
    TASK_STATE_HEADER,
    ExperimentRecord,
    MetricSeries,
    ModelFromResults,
    NewModelFromResults,
    NewTask,
    TaskInput,
    TaskRecord,
    TaskSummary,
)

router = APIRouter(prefix="/train-tasks", tags=["train tasks"])
_SUMMARIES = TypeAdapter(list[TaskSummary])
_RECORDS = TypeAdapter(list[TaskRecord])


def task_record(t: TrainTask, inputs: list[TaskInput] | None = None) -> TaskRecord:
    """The wire record of a task row (its columns, read by name), with ``inputs``."""
    record = TaskRecord.model_validate(t, from_attributes=True)
    return record.model_copy(update={"inputs": inputs}) if inputs else record


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
    group = live_group(session, body.quota_group_id)
    if group is None:
        raise not_found("quota group", body.quota_group_id)
    request = body.request.model_dump() if body.request else dict(group.default_request)
    total = held(request, body.num_nodes)
    if not fits(total, {}, group.capacity):
        wanted = ", ".join(f"{k}={total[k]:g}" for k in RESOURCE_KEYS)
        have = ", ".join(f"{k}={group.capacity.get(k, 0)}" for k in RESOURCE_KEYS)
        raise ApiError(
            400,
            ErrorCode.QUOTA_EXCEEDED,
            f"request ({wanted}) exceeds quota group {group.name!r} capacity ({have})",
        )
    try:
        ctx.scheduler.executor.check(body.num_nodes, request, group.name)
    except ValueError as err:
        raise bad_request(f"this task can never be placed: {err}") from err
    return request, output, project


def _identity(body: NewTask, output: str, session: Session, ctx) -> dict:
    """:func:`records.task_identity` of the task ``body`` would create."""
    mirror = session.get(Mirror, body.mirror_id)
    repo = ctx.paths.repo(body.algorithm_id)
    return {
        "commit": body.commit,
        "inputs": records.inputs_identity(session, body.mounts.model_dump()),
        "entrypoint": body.entrypoint,
        "hyperparameters": body.hyperparams,
        "mirror": body.mirror_id,
        "environment": records.environment_identity(repo, body.commit, mirror.python),
        "layout": [
            body.hyperparams_prefix,
            body.hyperparams_delimiter,
            output,
            body.num_nodes,
            body.nproc_per_node,
        ],
    }


@router.post("", status_code=201, response_model=TaskRecord)
def create_task(
    body: NewTask,
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    response: Response,
    idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER, max_length=100),
) -> TaskRecord:
    """Create a train task. A repeated ``Idempotency-Key`` returns the first task (200).

    With ``reuse="succeeded"``, an earlier SUCCEEDED task of the same commit, inputs (by
    checksum), entrypoint, hyperparameters, mirror, environment key, hyperparameter format,
    output folder and nodes × processes is answered instead (200, its id in
    ``X-Anylearn-Reused``), and nothing is created."""
    if idempotency_key:
        existing = session.scalar(
            select(TrainTask).where(
                TrainTask.owner_id == user.id, TrainTask.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            response.status_code = 200
            return task_record(existing)
    request, output, project = _validate(body, user, session, ctx)
    if body.reuse == "succeeded":
        earlier = records.find_identical(session, user.id, _identity(body, output, session, ctx))
        if earlier is not None:
            response.status_code = 200
            response.headers[REUSED_HEADER] = earlier.id
            return task_record(earlier)
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
    return task_record(task)


#: Bytes read from the end of a log for its last line in the summary listing.
LAST_LINE_WINDOW = 4096
LAST_LINE_CHARS = 200


def last_line(path: os.PathLike | str) -> str:
    """The last non-empty line of the file at ``path`` (at most 200 characters), or ""."""
    data, _ = tail(path, LAST_LINE_WINDOW)
    for line in reversed(data.splitlines()):
        text = line.decode(errors="replace").strip()
        if text:
            return text[:LAST_LINE_CHARS]
    return ""


@router.get(
    "",
    responses={200: {"model": list[TaskRecord] | list[TaskSummary]}},
    response_class=Response,
)
def list_tasks(
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    ids: str | None = Query(default=None, max_length=40 * 900),
    id_prefix: str | None = Query(default=None, max_length=40),
    state: str | None = Query(default=None, max_length=200),
    created_from: datetime | None = None,
    limit: int = Query(default=1000, ge=1, le=10_000),
    view: Literal["full", "summary"] = "full",
) -> Response:
    """The user's newest ``limit`` tasks, oldest first: :class:`TaskRecord` objects, or with
    ``view=summary`` :class:`TaskSummary` objects.

    Filters: ``ids`` (comma-separated, at most 900), ``id_prefix`` (ids starting with it, to
    resolve an abbreviated id), ``state`` (comma-separated states), ``created_from`` (ISO 8601;
    tasks created then or later). The summary is what a live table needs and nothing more: one
    query, and the log's last non-empty line only for tasks that started, so a watch of 1000
    tasks stays cheap.
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
    if id_prefix:
        query = query.where(TrainTask.id.startswith(id_prefix, autoescape=True))
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
        body = _RECORDS.dump_json([task_record(t) for t in reversed(session.scalars(query).all())])
    else:
        rows = _summaries(session.execute(query), ctx.paths.tasks)
        rows.reverse()
        body = _SUMMARIES.dump_json(rows)
    return Response(body, media_type="application/json")


SUMMARY_COLUMNS = (
    TrainTask.id,
    TrainTask.name,
    TrainTask.state,
    QuotaGroup.name.label("quota_group"),
    TrainTask.attempt,
    TrainTask.exit_code,
    TrainTask.error,
    TrainTask.created_at,
    TrainTask.started_at,
    TrainTask.finished_at,
)


def _summaries(rows, tasks_root: Path) -> list[TaskSummary]:
    """Summaries; only folders that exist are looked into for a log (a task that never
    started has none), so a long queue costs one directory listing."""
    root = str(tasks_root)
    with os.scandir(root) as entries:
        started = {entry.name for entry in entries}
    out = []
    for row in rows:
        log = os.path.join(root, row.id, TaskPaths.LOG_NAME)
        out.append(
            TaskSummary(**row._asdict(), last_line=last_line(log) if row.id in started else "")
        )
    return out


@router.get("/{task_id}", response_model=TaskRecord)
def get_task(task_id: str, user: CurrentUser, session: DB) -> TaskRecord:
    """The task's whole record, with ``inputs``: each mount's kind and id, and for datasets
    and models their name, checksum, file count and size in bytes."""
    task = owned_task(session, user, task_id)
    return task_record(task, records.task_inputs(session, task))


@router.get("/{task_id}/record", response_model=ExperimentRecord)
def get_experiment_record(
    task_id: str, user: CurrentUser, session: DB, ctx: Ctx
) -> ExperimentRecord:
    """The task's experiment record: code (commit, message, snapshot and changed files),
    data (inputs with checksums), parameters, environment (interpreter, packages), run
    (times, attempts, failure and last traceback) and results (metric series, output files
    with sha256). Built at each request, so while the task runs the series grow."""
    task = owned_task(session, user, task_id)
    return records.experiment_record(
        session,
        task,
        repos_root=ctx.paths.repos,
        tasks_root=ctx.paths.tasks,
        backend=ctx.server_id,
    )


@router.get("/{task_id}/metrics", response_model=dict[str, MetricSeries])
def get_metrics(
    task_id: str,
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    key: list[str] | None = Query(default=None, max_length=100),
) -> dict[str, MetricSeries]:
    """The task's metric series by key (all, or only the ``key`` ones): what it logged with
    ``log_metrics`` and the TensorBoard scalars under its output, as far as they go now."""
    task = owned_task(session, user, task_id)
    series, _, _ = records.results(TaskPaths.of(ctx.paths.tasks, task))
    return {k: v for k, v in series.items() if not key or k in key}


@router.post("/{task_id}/cancel", response_model=TaskRecord)
def cancel_task(task_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> TaskRecord:
    """Cancel a queued or running task; a terminal task is returned unchanged."""
    task = owned_task(session, user, task_id)
    ctx.scheduler.cancel(task.id)
    session.refresh(task)
    return task_record(task)


@router.delete("/{task_id}", status_code=204)
def delete_task(task_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Remove a finished task: its row and its folder (code, log, results). Refused (409)
    while it is queued or running, or while a live task mounts its results. A model
    registered from its results stays (its files were copied)."""
    task = owned_task(session, user, task_id)
    if not TaskState(task.state).is_terminal:
        raise conflict(f"task {task.id} is {task.state}; cancel it first")
    users = users_of(session, "pretrain", task.id)
    if users:
        raise conflict(f"the results of task {task.id} are mounted by {', '.join(users)}")
    folder = TaskPaths.of(ctx.paths.tasks, task).root
    session.delete(task)
    session.commit()
    shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=204)


def log_chunk(path: Path, offset: int) -> bytes:
    """Up to :data:`LOG_CHUNK_BYTES` of the log at ``path`` from byte ``offset`` (b"" past
    its end or when there is no log yet)."""
    try:
        with open(path, "rb") as f:
            if offset < os.fstat(f.fileno()).st_size:
                return os.pread(f.fileno(), LOG_CHUNK_BYTES, offset)
    except FileNotFoundError:
        pass
    return b""


@router.get(
    "/{task_id}/logs",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def task_logs(
    task_id: str,
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    offset: int = Query(default=0, ge=0, le=MAX_LOG_OFFSET),
) -> Response:
    """Up to 1 MiB of log bytes from byte ``offset``; ``X-Anylearn-Next-Offset`` says where to
    continue. An offset past the end answers no bytes (the log may grow up to it).

    ``X-Anylearn-Task-State`` carries the task's state, read before the bytes: when it is
    terminal the log is complete once the next offset stops moving.
    """
    task = owned_task(session, user, task_id)
    state = task.state
    data = log_chunk(TaskPaths.of(ctx.paths.tasks, task).log, offset)
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={NEXT_OFFSET_HEADER: str(offset + len(data)), TASK_STATE_HEADER: state},
    )


@router.post("/{task_id}/register-model", response_model=ModelFromResults)
def register_model(
    task_id: str,
    body: NewModelFromResults,
    user: CurrentUser,
    session: DB,
    ctx: Ctx,
    response: Response,
) -> ModelFromResults:
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
        raise conflict(
            f"task {task.id} is {task.state}; only a SUCCEEDED task's results become a model"
        )
    project = owned_project(session, user, body.project_id or task.project_id)
    output = TaskPaths.of(ctx.paths.tasks, task).output
    if not output.is_dir():
        raise conflict(f"the results of task {task.id} are gone")
    try:
        entries, skipped = ctx.objects.store_tree(output)
    except ValueError as err:
        raise bad_request(f"results of task {task.id}: {err}") from err
    rows = [[e.path, e.size, e.mode, e.sha256] for e in sorted(entries)]
    checksum = hashlib.sha256(canonical_rows(rows)).hexdigest()
    model = live_version(session, user, "model", checksum)
    response.status_code = 200
    if model is None:
        name = body.name or task.name
        model = version_of_rows(session, "model", user, project, name, rows, ResourceState.READY)
        response.status_code = 201
    add_refs(session, user.id, (e.sha256 for e in entries))
    session.commit()
    record = resource_record(model).model_dump()
    return ModelFromResults(**record, skipped=skipped, task_id=task.id)


@router.get(
    "/{task_id}/results",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
def task_results(task_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> FileResponse:
    """The task's output folder as an uncompressed tar (members relative to the folder), in
    whatever state the task is: a failed task's checkpoints are results too."""
    task = owned_task(session, user, task_id)
    output = TaskPaths.of(ctx.paths.tasks, task).output
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
