"""Mirrors (runtime environments) and quota groups: server-wide, listed to every user.

Both are shared infrastructure rather than user content, so every user sees them and only an
admin adds, changes or removes them (as a cluster's images and queues are managed by its
operators).
"""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from anylearn_sdk.server.context import (
    DB,
    AdminUser,
    ApiError,
    Ctx,
    CurrentUser,
    bad_request,
    conflict,
    not_found,
)
from anylearn_sdk.server.db import Mirror, QuotaGroup, TrainTask
from anylearn_sdk.server.scheduler import held
from anylearn_sdk.states import ErrorCode, TaskState
from anylearn_sdk.wire import (
    RESOURCE_KEYS,
    Amounts,
    MirrorRecord,
    MirrorUpdate,
    NewMirror,
    NewQuotaGroup,
    QuotaGroupRecord,
    QuotaGroupUpdate,
)

router = APIRouter()
PYTHON_CHECK_TIMEOUT_SECONDS = 30
#: The group tasks go to when they name none; it cannot be removed.
DEFAULT_QUOTA_GROUP = "default"


def mirror_record(m: Mirror) -> MirrorRecord:
    return MirrorRecord.model_validate(m, from_attributes=True)


def quota_group_record(g: QuotaGroup, usage: dict | None = None) -> QuotaGroupRecord:
    """A group; with ``usage`` (from :func:`group_usage`), also what its tasks hold now."""
    return QuotaGroupRecord(
        id=g.id,
        name=g.name,
        capacity=Amounts(**g.capacity),
        default_request=Amounts(**g.default_request),
        **(usage or {}),
    )


def group_usage(session: Session) -> dict[str, dict]:
    usage: dict[str, dict] = defaultdict(
        lambda: {"allocated": dict.fromkeys(RESOURCE_KEYS, 0), "running": 0, "queued": 0}
    )
    active = (TaskState.RUNNING.value, TaskState.QUEUED.value)
    rows = session.execute(
        select(
            TrainTask.quota_group_id, TrainTask.state, TrainTask.request, TrainTask.num_nodes
        ).where(TrainTask.state.in_(active))
    )
    for group_id, state, request, num_nodes in rows:
        entry = usage[group_id]
        if state == TaskState.RUNNING:
            entry["running"] += 1
            for key, amount in held(request, num_nodes).items():
                entry["allocated"][key] += amount
        else:
            entry["queued"] += 1
    return usage


@router.get("/mirrors", tags=["mirrors"], response_model=list[MirrorRecord])
def list_mirrors(_user: CurrentUser, session: DB, name: str | None = None) -> list[MirrorRecord]:
    query = select(Mirror).order_by(Mirror.created_at)
    if name is not None:
        query = query.where(Mirror.name == name)
    return [mirror_record(m) for m in session.scalars(query)]


@router.post("/mirrors", status_code=201, tags=["mirrors"], response_model=MirrorRecord)
def add_mirror(body: NewMirror, _admin: AdminUser, session: DB) -> MirrorRecord:
    """Add a mirror naming a Python interpreter on the server machine (admin only)."""
    if session.scalar(select(Mirror).where(Mirror.name == body.name)) is not None:
        raise conflict(f"mirror {body.name!r} already exists")
    _check_python(body.python)
    mirror = Mirror(name=body.name, python=body.python)
    session.add(mirror)
    session.commit()
    return mirror_record(mirror)


@router.patch("/mirrors/{name}", tags=["mirrors"], response_model=MirrorRecord)
def set_mirror(name: str, body: MirrorUpdate, _admin: AdminUser, session: DB) -> MirrorRecord:
    """Point a mirror at another interpreter (admin only): attempts that start afterwards
    run with it, and their environments are built over it (a new environment key)."""
    mirror = session.scalar(select(Mirror).where(Mirror.name == name))
    if mirror is None:
        raise not_found("mirror", name)
    _check_python(body.python)
    mirror.python = body.python
    session.commit()
    return mirror_record(mirror)


def _check_python(python: str) -> None:
    if "\0" in python or not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise bad_request(f"python {python!r} is not an absolute path to an executable")
    try:
        subprocess.run(
            [python, "-c", "import sys"],
            check=True,
            capture_output=True,
            timeout=PYTHON_CHECK_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise bad_request(f"python {python!r} does not run: {err}") from err


def live_group(session: Session, group_id: str) -> QuotaGroup | None:
    """The quota group ``group_id`` unless it was removed."""
    group = session.get(QuotaGroup, group_id)
    return None if group is None or group.deleted else group


def _group_by_name(session: Session, name: str) -> QuotaGroup:
    group = session.scalar(select(QuotaGroup).where(QuotaGroup.name == name))
    if group is None or group.deleted:
        raise not_found("quota group", name)
    return group


@router.get("/quota-groups", tags=["quota groups"], response_model=list[QuotaGroupRecord])
def list_quota_groups(
    _user: CurrentUser, session: DB, name: str | None = None
) -> list[QuotaGroupRecord]:
    """The quota groups, oldest first, with what their tasks hold now."""
    query = select(QuotaGroup).where(QuotaGroup.deleted.is_(False)).order_by(QuotaGroup.created_at)
    if name is not None:
        query = query.where(QuotaGroup.name == name)
    usage = group_usage(session)
    return [quota_group_record(g, usage[g.id]) for g in session.scalars(query)]


def _check_request_fits(name: str, request: Amounts, capacity: Amounts) -> None:
    over = [k for k in RESOURCE_KEYS if getattr(request, k) > getattr(capacity, k)]
    if over:
        raise ApiError(
            400,
            ErrorCode.QUOTA_EXCEEDED,
            f"default_request of quota group {name!r} exceeds its capacity in {', '.join(over)}",
        )


@router.post(
    "/quota-groups", status_code=201, tags=["quota groups"], response_model=QuotaGroupRecord
)
def add_quota_group(body: NewQuotaGroup, _admin: AdminUser, session: DB) -> QuotaGroupRecord:
    """Add a quota group (admin only); a removed group of that name comes back."""
    _check_request_fits(body.name, body.default_request, body.capacity)
    group = session.scalar(select(QuotaGroup).where(QuotaGroup.name == body.name))
    if group is not None and not group.deleted:
        raise conflict(f"quota group {body.name!r} already exists")
    if group is None:
        group = QuotaGroup(name=body.name)
        session.add(group)
    group.deleted = False
    group.capacity = body.capacity.model_dump()
    group.default_request = body.default_request.model_dump()
    session.commit()
    return quota_group_record(group)


@router.patch("/quota-groups/{name}", tags=["quota groups"], response_model=QuotaGroupRecord)
def set_quota_group(
    name: str, body: QuotaGroupUpdate, _admin: AdminUser, session: DB, ctx: Ctx
) -> QuotaGroupRecord:
    """Change a group's capacity or default request (admin only): the amounts given replace
    those of the group, the others stay. Running tasks keep what they hold; queued ones are
    admitted against the new capacity."""
    group = _group_by_name(session, name)

    def merged(current: dict, given: Amounts | None) -> Amounts:
        return Amounts(**{**current, **(given.model_dump(exclude_unset=True) if given else {})})

    capacity = merged(group.capacity, body.capacity)
    default_request = merged(group.default_request, body.default_request)
    _check_request_fits(name, default_request, capacity)
    group.capacity = capacity.model_dump()
    group.default_request = default_request.model_dump()
    session.commit()
    ctx.scheduler.wake()
    return quota_group_record(group, group_usage(session)[group.id])


@router.delete("/quota-groups/{name}", status_code=204, tags=["quota groups"])
def remove_quota_group(name: str, _admin: AdminUser, session: DB) -> Response:
    """Remove a quota group (admin only). Refused (409) while tasks are queued or running in
    it, and for the default group. Finished tasks' records still name it."""
    group = _group_by_name(session, name)
    if group.name == DEFAULT_QUOTA_GROUP:
        raise conflict(f"the {DEFAULT_QUOTA_GROUP!r} quota group cannot be removed")
    usage = group_usage(session).get(group.id)
    if usage and (usage["running"] or usage["queued"]):
        raise conflict(
            f"quota group {name!r} has {usage['running']} running and {usage['queued']} "
            "queued task(s); cancel them or wait for them to end"
        )
    group.deleted = True
    session.commit()
    return Response(status_code=204)
