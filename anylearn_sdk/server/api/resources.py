"""Datasets and models: versions addressed by their manifest checksum.

``POST /datasets`` (or ``/models``) with a manifest registers a version and answers which
objects the server lacks (``missing``, sha256 digests); the client uploads only those through
tus (:mod:`anylearn_sdk.server.api.uploads`). A version is READY once every object of its
manifest is in the verified object store; a pack that fails verification makes it ERROR.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse
from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from anylearn_sdk.protocol import (
    SHA256_HEX,
    apply_delta,
    canonical_rows,
    splice_manifest,
    validate_manifest,
)
from anylearn_sdk.server.api.accounts import owned_project
from anylearn_sdk.server.context import (
    DB,
    Ctx,
    CurrentUser,
    bad_request,
    conflict,
    not_found,
)
from anylearn_sdk.server.db import (
    MissingObject,
    ObjectRef,
    Project,
    Resource,
    TrainTask,
    Upload,
    User,
    new_id,
)
from anylearn_sdk.server.objects import ObjectStore
from anylearn_sdk.states import TERMINAL_TASK_STATES, ResourceState, UploadState
from anylearn_sdk.wire import DigestList, MissingObjects, NewResource, ResourceRecord

KINDS = {"dataset": ("datasets", "dset"), "model": ("models", "model")}
#: Bound parameters per query (SQLite's default limit is 999).
SQL_BATCH = 900
objects_router = APIRouter(prefix="/objects", tags=["objects"])


@objects_router.post("/missing", response_model=MissingObjects)
def missing_objects(body: DigestList, user: CurrentUser, session: DB, ctx: Ctx) -> MissingObjects:
    """Which of ``digests`` the caller would have to upload (read-only; for previews)."""
    bad = [d for d in body.digests if not SHA256_HEX.fullmatch(d)]
    if bad:
        raise bad_request(f"not a sha256 digest: {bad[0]!r}")
    return MissingObjects(missing=missing_for(session, ctx.objects, user.id, body.digests))


@objects_router.get(
    "/{sha256}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_object(sha256: str, user: CurrentUser, session: DB, ctx: Ctx) -> FileResponse:
    """The bytes of a stored object the caller owns (``ETag`` is its sha256), so a node can
    fetch the objects it lacks and verify each; 404 for any other digest, so nobody learns
    whether someone else holds a file."""
    if not SHA256_HEX.fullmatch(sha256) or session.get(ObjectRef, (user.id, sha256)) is None:
        raise not_found("object", sha256)
    path = ctx.objects.path_for(sha256)
    if not path.is_file():
        raise not_found("object", sha256)
    return FileResponse(
        path, media_type="application/octet-stream", headers={"ETag": f'"{sha256}"'}
    )


def resource_record(
    res: Resource, *, missing: list[str] | None = None, manifest: bool = False
) -> ResourceRecord:
    """The wire record of a version. Built field by field, not from the row's attributes: the
    manifest is a deferred column (megabytes for 20,000 files) read only when asked for."""
    return ResourceRecord(
        id=res.id,
        kind=res.kind,
        name=res.name,
        project_id=res.project_id,
        checksum=res.checksum,
        state=res.state,
        file_count=res.file_count,
        total_bytes=res.total_bytes,
        error=res.error,
        created_at=res.created_at,
        missing=missing,
        manifest=[e.to_json() for e in res.entries()] if manifest else None,
    )


def users_of(session: Session, kind: str, resource_id: str) -> list[str]:
    """Ids of the queued or running tasks that mount ``resource_id`` (a dataset, a model, or
    for ``kind="pretrain"`` a task's results)."""
    live = session.execute(
        select(TrainTask.id, TrainTask.mounts).where(
            TrainTask.state.not_in(list(TERMINAL_TASK_STATES))
        )
    )
    return [
        task_id
        for task_id, mounts in live
        if resource_id in ((mounts or {}).get(kind) or {}).get("ids", [])
    ]


def owned_resource(session: Session, user: User, kind: str, resource_id: str) -> Resource:
    res = session.get(Resource, resource_id)
    if (
        res is None
        or res.owner_id != user.id
        or res.kind != kind
        or res.state == ResourceState.DELETED
    ):
        raise not_found(kind, resource_id)
    return res


def missing_for(
    session: Session, objects: ObjectStore, owner_id: str, digests: Iterable[str]
) -> list[str]:
    """The digests (deduplicated, sorted) that ``owner_id`` does not own in the store."""
    wanted = sorted(set(digests))
    owned: set[str] = set()
    for i in range(0, len(wanted), SQL_BATCH):
        batch = wanted[i : i + SQL_BATCH]
        owned.update(
            session.scalars(
                select(ObjectRef.sha256).where(
                    ObjectRef.owner_id == owner_id, ObjectRef.sha256.in_(batch)
                )
            )
        )
    return [d for d in wanted if d not in owned or not objects.has(d)]


def add_refs(session: Session, owner_id: str, digests: Iterable[str]) -> None:
    """Record that ``owner_id`` uploaded (and the server verified) these objects: one
    insert-or-ignore of every row (two verifying threads may record the same object)."""
    rows = [{"owner_id": owner_id, "sha256": d} for d in sorted(set(digests))]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    upsert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(upsert(ObjectRef).on_conflict_do_nothing(), rows)


def track_missing(session: Session, res: Resource, missing: Mapping[str, int]) -> None:
    """Record the objects a new version lacks (sha256 → size; its row must be flushed);
    READY if none."""
    rows = [{"resource_id": res.id, "sha256": d, "size": missing[d]} for d in sorted(missing)]
    if rows:  # a Core insert: one executemany, not the ORM's bulk path (10x slower)
        session.execute(insert(MissingObject.__table__), rows)
    elif res.state in (ResourceState.CREATED, ResourceState.UPLOADING):
        res.state = ResourceState.READY


def objects_stored(session: Session, resource_id: str, digests: Iterable[str]) -> None:
    """Strike ``digests`` off the version's missing objects (batched deletes)."""
    wanted = sorted(set(digests))
    for i in range(0, len(wanted), SQL_BATCH):
        session.execute(
            delete(MissingObject).where(
                MissingObject.resource_id == resource_id,
                MissingObject.sha256.in_(wanted[i : i + SQL_BATCH]),
            )
        )


def objects_arrived(session: Session, owner_id: str, digests: list[str]) -> None:
    """A preupload of ``owner_id`` stored ``digests`` (its refs are committed): strike them off
    the owner's versions still UPLOADING and mark READY those that lack nothing more.

    A version registered while the preupload was stored is not left waiting for them: this
    runs after the refs' commit, and a registration asks again after its own commit
    (:func:`still_missing`), so one of the two sees the other.
    """
    waiting = session.scalars(
        select(Resource.id).where(
            Resource.owner_id == owner_id, Resource.state == ResourceState.UPLOADING
        )
    )
    for resource_id in list(waiting):
        objects_stored(session, resource_id, digests)
        session.commit()
        res = session.get(Resource, resource_id, with_for_update=True, populate_existing=True)
        if res is not None:
            ready_if_complete(session, res)
        session.commit()


def ready_if_complete(session: Session, res: Resource) -> None:
    """Mark ``res`` READY if it lacks no object any more (one count)."""
    if res.state not in (ResourceState.CREATED, ResourceState.UPLOADING):
        return
    left = session.scalar(
        select(func.count()).select_from(MissingObject).where(MissingObject.resource_id == res.id)
    )
    if not left:
        res.state = ResourceState.READY


def preuploads_arriving(session: Session, owner_id: str) -> bool:
    """True if a preupload of ``owner_id`` is being received or verified."""
    return (
        session.scalar(
            select(Upload.id)
            .where(
                Upload.owner_id == owner_id,
                Upload.resource_id.is_(None),
                Upload.state.in_([UploadState.RECEIVING, UploadState.VERIFYING]),
            )
            .limit(1)
        )
        is not None
    )


def still_missing(session: Session, res: Resource, objects: ObjectStore) -> list[str]:
    """The objects ``res`` still lacks, asked again (a registration of an existing version):
    its missing list, less what its owner has come to own since (through another version's
    upload, say); READY if nothing is left."""
    if res.state == ResourceState.READY:
        return []
    listed = list(
        session.scalars(select(MissingObject.sha256).where(MissingObject.resource_id == res.id))
    )
    missing = missing_for(session, objects, res.owner_id, listed)
    objects_stored(session, res.id, set(listed) - set(missing))
    if not missing and res.state in (ResourceState.CREATED, ResourceState.UPLOADING):
        res.state = ResourceState.READY
    return missing


def live_version(session: Session, user: User, kind: str, checksum: str) -> Resource | None:
    """The user's version of ``kind`` with this checksum that is neither DELETED nor ERROR."""
    return session.scalar(
        select(Resource).where(
            Resource.owner_id == user.id,
            Resource.kind == kind,
            Resource.checksum == checksum,
            Resource.state.not_in([ResourceState.DELETED, ResourceState.ERROR]),
        )
    )


@dataclass
class _Described:
    """The manifest a registration describes, checked: its canonical bytes, counts, and the
    objects whose presence must be asked (sha256 → size)."""

    canonical: bytes
    file_count: int
    total_bytes: int
    to_check: dict[str, int]

    @classmethod
    def of_rows(cls, rows: list) -> _Described:
        sizes = {row[3]: row[1] for row in rows}
        return cls(canonical_rows(rows), len(rows), sum(row[1] for row in rows), sizes)


def _described(session: Session, user: User, kind: str, body: NewResource) -> _Described:
    """The manifest the request describes: whole, or a delta applied to its base version.

    A delta against a READY base checks only what changed: the base's entries were checked
    when it was registered, and its owner owns every object of it. One that only changes or
    removes files is spliced into the base's canonical bytes
    (:func:`~anylearn_sdk.protocol.splice_manifest`); one that adds files is applied to its
    rows.

    Raises:
        ApiError: 409 if the base version is unknown (the client then sends it whole).
        ValueError: a malformed entry, or the delta does not fit its base.
    """
    if body.base_checksum is None:
        if body.manifest is None:
            raise bad_request("give manifest, or base_checksum with changes and removed")
        entries = validate_manifest(body.manifest)
        return _Described.of_rows([[e.path, e.size, e.mode, e.sha256] for e in entries])
    base = live_version(session, user, kind, body.base_checksum)
    if base is None:
        raise conflict(f"base {kind} {body.base_checksum} not found; send it whole")
    changes = validate_manifest(body.changes)  # malformed entries: a 400 naming the entry
    edits = {e.path: [e.path, e.size, e.mode, e.sha256] for e in changes}
    if set(edits).intersection(body.removed):
        raise ValueError("a path is both changed and removed")
    spliced = None
    if base.state == ResourceState.READY:  # else every object is asked for: rows needed
        spliced = splice_manifest(base.canonical, {**edits, **dict.fromkeys(body.removed)})
    if spliced is None:
        return _Described.of_rows(apply_delta(base.rows(), changes, body.removed))
    canonical, before = spliced
    total = base.total_bytes + sum(e.size for e in changes) - sum(r[1] for r in before.values())
    return _Described(
        canonical,
        base.file_count - len(body.removed),
        total,
        {e.sha256: e.size for e in changes},
    )


def new_version(
    session: Session,
    kind: str,
    user: User,
    project: Project,
    name: str,
    manifest: _Described,
    state: ResourceState = ResourceState.UPLOADING,
) -> Resource:
    """Add a version of ``kind`` with this checked manifest."""
    res = Resource(
        id=new_id(KINDS[kind][1]),
        kind=kind,
        owner_id=user.id,
        project_id=project.id,
        name=name,
        checksum=hashlib.sha256(manifest.canonical).hexdigest(),
        state=state,
        canonical=manifest.canonical,
        file_count=manifest.file_count,
        total_bytes=manifest.total_bytes,
    )
    session.add(res)
    return res


def version_of_rows(
    session: Session,
    kind: str,
    user: User,
    project: Project,
    name: str,
    rows: list,
    state: ResourceState = ResourceState.UPLOADING,
) -> Resource:
    """:func:`new_version` of manifest ``rows`` (checked, sorted by path)."""
    return new_version(session, kind, user, project, name, _Described.of_rows(rows), state)


def make_router(kind: str) -> APIRouter:
    plural = KINDS[kind][0]
    router = APIRouter(prefix=f"/{plural}", tags=[plural])

    # Read-only handlers are coroutines: they skip the thread-pool hop, and a WAL read never
    # waits for a lock, so the event loop is not held up.
    @router.get("", name=f"list_{plural}", response_model=list[ResourceRecord])
    async def list_resources(
        user: CurrentUser,
        session: DB,
        checksum: str | None = None,
        name: str | None = None,
        id_prefix: str | None = None,
    ) -> list[ResourceRecord]:
        """The user's versions, oldest first; filters: ``checksum``, ``name``, ``id_prefix``
        (versions whose id starts with it)."""
        query = (
            select(Resource)
            .where(
                Resource.owner_id == user.id,
                Resource.kind == kind,
                Resource.state != ResourceState.DELETED,
            )
            .order_by(Resource.created_at)
        )
        if checksum is not None:
            query = query.where(Resource.checksum == checksum)
        if name is not None:
            query = query.where(Resource.name == name)
        if id_prefix:
            query = query.where(Resource.id.startswith(id_prefix, autoescape=True))
        return [resource_record(r) for r in session.scalars(query)]

    @router.post("", name=f"register_{kind}", response_model=ResourceRecord)
    def register(
        body: NewResource, user: CurrentUser, session: DB, ctx: Ctx, response: Response
    ) -> ResourceRecord:
        """Register a version by manifest; idempotent on (user, checksum).

        Answers 201 for a new version, 200 for an existing one, with ``missing``: the sha256
        digests of the objects to upload, or that the user's preuploads still bring.
        """
        try:
            described = _described(session, user, kind, body)
        except ValueError as err:
            raise bad_request(str(err)) from err
        if hashlib.sha256(described.canonical).hexdigest() != body.checksum:
            raise bad_request(f"checksum {body.checksum} does not match the manifest")
        project = owned_project(session, user, body.project_id)
        res = live_version(session, user, kind, body.checksum)
        response.status_code = 200
        if res is None:
            # Asked before what is missing: a preupload stored since (its objects and state
            # are committed together) is one of these.
            arriving = preuploads_arriving(session, user.id)
            res = new_version(session, kind, user, project, body.name, described)
            response.status_code = 201
            sizes = described.to_check
            missing = missing_for(session, ctx.objects, user.id, sizes)
            session.flush()
            track_missing(session, res, {d: sizes[d] for d in missing})
            if missing and arriving:
                # Preuploads strike their objects off the versions they see when stored
                # (objects_arrived); one stored after they were asked but before this version
                # was committed did not see it: ask again.
                session.commit()
                res = session.get(Resource, res.id, with_for_update=True, populate_existing=True)
                missing = still_missing(session, res, ctx.objects)
        else:
            missing = still_missing(session, res, ctx.objects)
        session.commit()
        return resource_record(res, missing=missing)

    @router.get("/{resource_id}", name=f"get_{kind}", response_model=ResourceRecord)
    async def get_resource(
        resource_id: str, user: CurrentUser, session: DB, manifest: bool = False
    ) -> ResourceRecord:
        res = owned_resource(session, user, kind, resource_id)
        return resource_record(res, manifest=manifest)

    @router.delete("/{resource_id}", status_code=204, name=f"delete_{kind}")
    def delete_resource(resource_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
        """Mark the version DELETED and remove its materialized tree; its objects stay for
        other versions that share them. Refused (409) while a queued or running task mounts
        it."""
        res = owned_resource(session, user, kind, resource_id)
        tasks = users_of(session, kind, res.id)
        if tasks:
            raise conflict(f"{kind} {res.id} is mounted by live task(s) {', '.join(tasks)}")
        res.state = ResourceState.DELETED
        session.commit()
        shutil.rmtree(ctx.paths.materialized / res.id, ignore_errors=True)
        return Response(status_code=204)

    return router
