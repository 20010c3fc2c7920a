"""Algorithms: code in a git repository on the backend, run at an exact commit."""

from __future__ import annotations

import re
from dataclasses import dataclass

from anylearn_sdk import gitsync
from anylearn_sdk.client.http import make_body
from anylearn_sdk.errors import InvalidArgumentError, NotFoundError
from anylearn_sdk.progress import ProgressCallback
from anylearn_sdk.session import SdkContext
from anylearn_sdk.wire import AlgorithmRecord, NewAlgorithm

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Algorithm:
    """An algorithm and the commit a task runs.

    Attributes:
        id: the backend's id.
        name: unique per user.
        commit: full sha the task is pinned to.
        pushed: True if this call pushed the commit (False: the server had it already).
    """

    id: str
    name: str
    commit: str | None = None
    pushed: bool = False


def algorithm_name_for(folder_name: str) -> str:
    """A valid algorithm name from a folder name (letters, digits, ``.``, ``_``, ``-``)."""
    name = _NAME_OK.sub("-", folder_name).strip("-._") or "algorithm"
    return name[:100]


def find_algorithm(
    ctx: SdkContext, algorithm_id: str | None, name: str | None
) -> AlgorithmRecord | None:
    """The algorithm by id (which must exist) or by name (None if there is none yet)."""
    if algorithm_id is not None:
        path = f"/algorithms/{algorithm_id}"
        try:
            return ctx.api.call("GET", path, AlgorithmRecord, resource_id=algorithm_id)
        except NotFoundError as err:
            raise InvalidArgumentError(f"algorithm_id {algorithm_id!r} not found") from err
    found = ctx.api.call("GET", "/algorithms", list[AlgorithmRecord], params={"name": name})
    return found[0] if found else None


def has_commit(ctx: SdkContext, algorithm_id: str, sha: str) -> bool:
    """Whether the server's repository of the algorithm holds commit ``sha``.

    Only a 404 means "missing"; any other failure is raised, never read as a missing commit.

    Raises:
        AuthenticationError, ServerError, HTTPError: the question could not be answered.
    """
    path = f"/algorithms/{algorithm_id}/commits/{sha}"
    try:
        ctx.api.request("GET", path, resource_id=sha)
    except NotFoundError:
        return False
    return True


def sync_algorithm(
    ctx: SdkContext,
    existing: AlgorithmRecord | None,
    name: str,
    project_id: str,
    snap: gitsync.Snapshot,
    progress: ProgressCallback,
) -> Algorithm:
    """Create the algorithm if needed and push ``snap.commit`` unless the server has it."""
    record = existing or ctx.api.call(
        "POST",
        "/algorithms",
        AlgorithmRecord,
        make_body(NewAlgorithm, name=name, project_id=project_id),
    )
    if has_commit(ctx, record.id, snap.commit):
        progress.message(
            f"algorithm {record.name!r}: commit {snap.commit[:12]} already on the server, "
            "nothing pushed"
        )
        return Algorithm(record.id, record.name, snap.commit, pushed=False)
    gitsync.push(snap, ctx.api.url(record.git_path), ctx.settings.token)
    kind = "snapshot of the working tree" if snap.snapshot else "commit"
    progress.message(f"algorithm {record.name!r}: pushed {kind} {snap.commit[:12]}")
    return Algorithm(record.id, record.name, snap.commit, pushed=True)
