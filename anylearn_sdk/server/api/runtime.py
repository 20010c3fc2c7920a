"""Mirrors (runtime environments) and quota groups: server-wide, listed to every user.

Both are shared infrastructure rather than user content, so every user sees them and only an
admin adds them (as a cluster's images and queues are managed by its operators).
"""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from anylearn_sdk.server.api.accounts import NAME_PATTERN
from anylearn_sdk.server.context import DB, AdminUser, ApiError, CurrentUser, bad_request
from anylearn_sdk.server.db import Mirror, QuotaGroup, TrainTask
from anylearn_sdk.server.scheduler import RESOURCE_KEYS
from anylearn_sdk.states import ErrorCode, TaskState

router = APIRouter()
PYTHON_CHECK_TIMEOUT_SECONDS = 30


class NewMirror(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    python: str


class Amounts(BaseModel):
    """Resource amounts: CPUs (may be fractional), memory in MiB, whole GPUs."""

    cpu: float = Field(default=0, ge=0)
    memory_mb: int = Field(default=0, ge=0)
    gpu: int = Field(default=0, ge=0)


class NewQuotaGroup(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    capacity: Amounts
    default_request: Amounts = Amounts(cpu=1)


def mirror_json(m: Mirror) -> dict:
    return {"id": m.id, "name": m.name, "python": m.python}


def quota_group_json(g: QuotaGroup, usage: dict | None = None) -> dict:
    """A group; with ``usage``, also what every user's tasks hold now: ``allocated`` (the sum
    of the RUNNING tasks' requests), ``running`` and ``queued`` (task counts)."""
    data = {
        "id": g.id,
        "name": g.name,
        "capacity": g.capacity,
        "default_request": g.default_request,
    }
    if usage is not None:
        data.update(usage)
    return data


def _usage(session: Session) -> dict[str, dict]:
    usage: dict[str, dict] = defaultdict(
        lambda: {"allocated": dict.fromkeys(RESOURCE_KEYS, 0), "running": 0, "queued": 0}
    )
    active = (TaskState.RUNNING.value, TaskState.QUEUED.value)
    rows = session.execute(
        select(TrainTask.quota_group_id, TrainTask.state, TrainTask.request).where(
            TrainTask.state.in_(active)
        )
    )
    for group_id, state, request in rows:
        entry = usage[group_id]
        if state == TaskState.RUNNING:
            entry["running"] += 1
            for key in RESOURCE_KEYS:
                entry["allocated"][key] += request.get(key, 0)
        else:
            entry["queued"] += 1
    return usage


@router.get("/mirrors", tags=["mirrors"])
def list_mirrors(_user: CurrentUser, session: DB, name: str | None = None) -> list[dict]:
    query = select(Mirror).order_by(Mirror.created_at)
    if name is not None:
        query = query.where(Mirror.name == name)
    return [mirror_json(m) for m in session.scalars(query)]


@router.post("/mirrors", status_code=201, tags=["mirrors"])
def add_mirror(body: NewMirror, _admin: AdminUser, session: DB) -> dict:
    """Add a mirror naming a Python interpreter on the server machine (admin only)."""
    if not os.path.isabs(body.python) or not os.access(body.python, os.X_OK):
        raise bad_request(f"python {body.python!r} is not an absolute path to an executable")
    try:
        subprocess.run(
            [body.python, "-c", "import sys"],
            check=True,
            capture_output=True,
            timeout=PYTHON_CHECK_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise bad_request(f"python {body.python!r} does not run: {err}") from err
    if session.scalar(select(Mirror).where(Mirror.name == body.name)) is not None:
        raise ApiError(409, ErrorCode.CONFLICT, f"mirror {body.name!r} already exists")
    mirror = Mirror(name=body.name, python=body.python)
    session.add(mirror)
    session.commit()
    return mirror_json(mirror)


@router.get("/quota-groups", tags=["quota groups"])
def list_quota_groups(_user: CurrentUser, session: DB, name: str | None = None) -> list[dict]:
    query = select(QuotaGroup).order_by(QuotaGroup.created_at)
    if name is not None:
        query = query.where(QuotaGroup.name == name)
    usage = _usage(session)
    return [quota_group_json(g, usage[g.id]) for g in session.scalars(query)]


@router.post("/quota-groups", status_code=201, tags=["quota groups"])
def add_quota_group(body: NewQuotaGroup, _admin: AdminUser, session: DB) -> dict:
    """Add a quota group (admin only)."""
    if session.scalar(select(QuotaGroup).where(QuotaGroup.name == body.name)) is not None:
        raise ApiError(409, ErrorCode.CONFLICT, f"quota group {body.name!r} already exists")
    group = QuotaGroup(
        name=body.name,
        capacity=body.capacity.model_dump(),
        default_request=body.default_request.model_dump(),
    )
    session.add(group)
    session.commit()
    return quota_group_json(group)
