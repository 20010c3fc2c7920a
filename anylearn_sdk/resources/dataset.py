"""Datasets and models: versions addressed by the checksum of their manifest.

Dedup, cheapest check first: the local store (checksum → id on this server, confirmed with
one GET), then the server (``?checksum=``); otherwise the manifest is registered, the server
answers which objects it lacks, and only those travel (:mod:`.upload`: small files packed,
large ones alone or in parallel parts, every unit journaled for resume) on a worker thread
while the caller polls the version's state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal, cast

from anylearn_sdk.content.manifest import Manifest
from anylearn_sdk.errors import (
    AnylearnError,
    AnylearnTimeoutError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ResourceError,
)
from anylearn_sdk.progress import UPLOADING, VERIFYING, ProgressCallback
from anylearn_sdk.resources.ids import resolve_id
from anylearn_sdk.resources.upload import Preuploads, UploadRun, plan_units, upload_streams
from anylearn_sdk.session import SdkContext, get_context
from anylearn_sdk.states import ResourceState, UploadState
from anylearn_sdk.wire import NewResource, ResourceRecord, UploadRecord

PLURALS = {"dataset": "datasets", "model": "models"}
#: First readiness poll after an upload ends comes fast; later ones back off to the caller's
#: ``resource_polling`` interval (seconds).
FIRST_POLL_SECONDS = 0.05


class Dataset(ResourceRecord):
    """A dataset version.

    Attributes:
        id: the backend's id.
        name: a label (versions with the same content share one id whatever their name).
        checksum: sha256 of the canonical manifest.
        state: :class:`ResourceState`.
        file_count: files in the manifest.
        total_bytes: bytes in the manifest.
        uploaded_bytes: bytes this call sent (0 when the content was already there, and in
            listings).
        project_id, error, created_at: as the server records them.
    """

    kind: Literal["dataset", "model"] = "dataset"
    uploaded_bytes: int = 0


class Model(Dataset):
    """A model version (same fields as :class:`Dataset`)."""

    kind: Literal["dataset", "model"] = "model"


def class_for(kind: str) -> type[Dataset]:
    return Model if kind == "model" else Dataset


def get_version(ctx: SdkContext, kind: str, resource_id: str) -> Dataset:
    """The version ``resource_id`` of ``kind``.

    Raises:
        NotFoundError: no such version of yours.
    """
    path = f"/{PLURALS[kind]}/{resource_id}"
    return ctx.api.call("GET", path, class_for(kind), resource_id=resource_id)


def get_ready(ctx: SdkContext, kind: str, resource_id: str, arg: str) -> Dataset:
    """An existing READY version by id.

    Raises:
        InvalidArgumentError: it does not exist, or is not READY.
    """
    try:
        found = get_version(ctx, kind, resource_id)
    except NotFoundError as err:
        raise InvalidArgumentError(f"{arg} {resource_id!r} not found") from err
    if found.state != ResourceState.READY:
        raise InvalidArgumentError(f"{arg} {resource_id!r} is {found.state}, not READY")
    return found


def list_versions(
    ctx: SdkContext,
    kind: str,
    *,
    name: str | None = None,
    checksum: str | None = None,
    id_prefix: str | None = None,
) -> list[Dataset]:
    """The user's versions of ``kind`` (DELETED ones left out), oldest first."""
    params = {"name": name, "checksum": checksum, "id_prefix": id_prefix}
    params = {k: v for k, v in params.items() if v is not None}
    return ctx.api.call("GET", f"/{PLURALS[kind]}", list[class_for(kind)], params=params)


def list_datasets(
    *, name: str | None = None, checksum: str | None = None, context: SdkContext | None = None
) -> list[Dataset]:
    """Your dataset versions (DELETED ones left out), oldest first; filter by ``name`` or
    ``checksum`` (sha256 of the manifest)."""
    return list_versions(context or get_context(), "dataset", name=name, checksum=checksum)


def list_models(
    *, name: str | None = None, checksum: str | None = None, context: SdkContext | None = None
) -> list[Model]:
    """Your model versions (DELETED ones left out), oldest first; see :func:`list_datasets`."""
    found = list_versions(context or get_context(), "model", name=name, checksum=checksum)
    return cast(list[Model], found)  # class_for("model") parses into Model


def resolve_version_id(ctx: SdkContext, kind: str, ref: str) -> str:
    """The id of your ``kind`` version that ``ref`` names: its id, or a unique prefix of it
    (with or without the ``dset-``/``model-`` part).

    Raises:
        NotFoundError: no version matches.
        InvalidArgumentError: several do.
    """
    return resolve_id(
        kind,
        ref,
        lambda prefix: [v.id for v in list_versions(ctx, kind, id_prefix=prefix)],
    )


def _delete(kind: str, ref: str, context: SdkContext | None) -> str:
    ctx = context or get_context()
    resource_id = resolve_version_id(ctx, kind, ref)
    ctx.api.request("DELETE", f"/{PLURALS[kind]}/{resource_id}", resource_id=resource_id)
    return resource_id


def delete_dataset(dataset_id: str, *, context: SdkContext | None = None) -> str:
    """Delete a dataset version (its id or a unique prefix); returns the full id.

    Files it shares with other versions stay.

    Raises:
        ConflictError: a queued or running task mounts it.
        NotFoundError: no such version of yours.
    """
    return _delete("dataset", dataset_id, context)


def delete_model(model_id: str, *, context: SdkContext | None = None) -> str:
    """Delete a model version; see :func:`delete_dataset`."""
    return _delete("model", model_id, context)


def known_resource(ctx: SdkContext, kind: str, checksum: str) -> Dataset | None:
    """The server's version with this checksum, asking the local store first: a READY one,
    or one still UPLOADING that the local store remembers (a run to take over)."""
    resource_id = ctx.store.remote_resource(ctx.server_id, kind, checksum)
    if resource_id is not None:
        try:
            found: Dataset | None = get_version(ctx, kind, resource_id)
        except NotFoundError:
            found = None
        if found is not None and found.state in (ResourceState.READY, ResourceState.UPLOADING):
            return found
        ctx.store.forget_resource(ctx.server_id, kind, checksum)  # deleted or failed remotely
    ready = [
        v for v in list_versions(ctx, kind, checksum=checksum) if v.state == ResourceState.READY
    ]
    return ready[0] if ready else None


def last_known(ctx: SdkContext, kind: str, key: str) -> tuple[str, Dataset | None] | None:
    """(checksum, :func:`known_resource` of it) for the folder or archive ``key``'s last
    manifest, or None if it has none.

    Meant to run while the folder is walked again: an unchanged resubmit then costs the longer
    of the walk and one round trip rather than their sum.
    """
    last = ctx.store.folder_manifest(key)
    if last is None:
        return None
    return last.checksum, known_resource(ctx, kind, last.checksum)


@dataclass
class PendingUpload:
    """A version being uploaded: poll it with :func:`await_ready`.

    Attributes:
        upload_bytes: bytes the plan sends (packs included), 0 if nothing was missing.
        early: the preuploads of this version's files, maybe still travelling.
    """

    resource: Dataset
    future: Future | None
    upload_bytes: int = 0
    early: Preuploads | None = None


def start_sync(
    ctx: SdkContext,
    kind: str,
    manifest: Manifest,
    name: str,
    project_id: str | None | Callable[[], str | None],
    pool: ThreadPoolExecutor,
    progress: ProgressCallback,
    guess: Future | None = None,
    interrupt: threading.Event | None = None,
    early: Preuploads | None = None,
) -> PendingUpload:
    """Make sure the server holds ``manifest``; start uploading what it lacks on ``pool``.

    Args:
        project_id: the project a new version is filed under (None: the user's default
            one), or a callable giving it (asked only if a new version must be registered, so
            an unchanged resubmit skips it).
        guess: a future of :func:`last_known`, used if it answered for this checksum.
        interrupt: set it to stop the upload's threads within a fraction of a second (the
            journal keeps what was sent, so a rerun resumes).
        early: the preuploads of the manifest's files (closed: every pack has left), maybe
            still travelling: the objects they bring are not sent again, and the version
            becomes READY as they are stored.
    """
    try:
        guessed = guess.result() if guess is not None else None
    except AnylearnError:
        guessed = None  # asked again below; a lasting failure is raised there
    if guessed is not None and guessed[0] == manifest.checksum:
        known = guessed[1]
    elif manifest.delta() is not None:
        # Changed since its last version: registering the few changed entries costs no more
        # than asking about the checksum first, and answers an existing version all the same.
        known = None
    else:
        known = known_resource(ctx, kind, manifest.checksum)
    if known is not None and known.state == ResourceState.READY:
        ctx.store.remember_resource(ctx.server_id, kind, manifest.checksum, known.id, name)
        progress.message(
            f"{kind} {name!r}: {manifest.file_count} files, {manifest.total_bytes} bytes, "
            f"already on the server as {known.id}"
        )
        return PendingUpload(known, None, early=early)
    version = _register(
        ctx, kind, manifest, name, project_id() if callable(project_id) else project_id
    )
    ctx.store.remember_resource(ctx.server_id, kind, manifest.checksum, version.id, name)
    travelling = early.digests if early is not None else frozenset()
    missing = [d for d in version.missing or [] if d not in travelling]
    version = version.model_copy(update={"missing": None})
    if not missing:
        if not travelling:
            progress.message(f"{kind} {name!r}: every file already on the server ({version.id})")
        return PendingUpload(version, None, early=early)
    sizes = manifest.sizes_for(missing)
    streams = upload_streams()
    sources = manifest.sources_for(missing)
    units = plan_units(version.id, missing, sizes, sources, streams, manifest.total_bytes)
    total = sum(u.body.length for u in units)
    progress.message(
        f"{kind} {name!r}: uploading {len(missing)} of {manifest.file_count} files "
        f"({total} bytes in {len(units)} uploads) as {version.id}"
    )
    # Beside the preuploads' own bar, if they still travel.
    phase = f"{UPLOADING} {name}" + (", the rest" if travelling else "")
    stop = interrupt or threading.Event()

    def upload() -> int:
        progress.phase_start(phase, total)
        try:
            run = UploadRun(
                ctx,
                version.id,
                units,
                lambda n: progress.advance(phase, n),
                streams=streams,
                interrupt=stop,
            )
            return run.run()
        finally:
            progress.phase_end(phase)

    return PendingUpload(version, pool.submit(upload), total, early)


def _register(
    ctx: SdkContext, kind: str, manifest: Manifest, name: str, project_id: str | None
) -> Dataset:
    """Register the version: as a delta against the folder's previous version when the server
    has it (a few entries instead of one per file), else with the whole manifest.

    The body is built with ``model_construct``: its entries come from our own manifest walk,
    and validating 20,000 of them again would cost more than sending them.
    """
    path, answer = f"/{PLURALS[kind]}", class_for(kind)
    common = {"name": name, "checksum": manifest.checksum, "project_id": project_id}
    delta = manifest.delta()
    if delta is not None:
        body = NewResource.model_construct(
            **common,
            base_checksum=delta.base_checksum,
            changes=[e.to_json() for e in delta.changes],
            removed=delta.removed,
            manifest=None,
        )
        try:
            return ctx.api.call("POST", path, answer, body)
        except ConflictError:
            pass  # the server lost the base version: send the whole manifest
    whole = NewResource.model_construct(
        **common,
        manifest=manifest.wire(),
        base_checksum=None,
        changes=[],
        removed=[],
    )
    return ctx.api.call("POST", path, answer, whole)


def _stored_bytes(ctx: SdkContext, resource_id: str) -> int:
    """Bytes of this version's uploads the server has verified and stored."""
    uploads = ctx.api.call(
        "GET", "/uploads", list[UploadRecord], params={"resource_id": resource_id}
    )
    return sum(u.length for u in uploads if u.state == UploadState.STORED and u.concat != "partial")


def await_ready(
    ctx: SdkContext,
    pending: PendingUpload,
    *,
    polling: float,
    timeout: float,
    progress: ProgressCallback,
) -> Dataset:
    """Poll the version every ``polling`` seconds until READY.

    Raises:
        ResourceError: the server marked it ERROR (a file failed verification), or refused
            a preupload of ``pending.early`` whose objects it waits for.
        AnylearnTimeoutError: not READY within ``timeout`` seconds.
        AnylearnError: the upload thread failed (its error is re-raised).
    """
    res = pending.resource
    early = pending.early
    preuploaded = early.finish() if early is not None else 0  # every pack acknowledged
    if pending.future is None and res.state == ResourceState.READY:
        # known READY a moment ago; nothing more was sent
        return res.model_copy(update={"uploaded_bytes": preuploaded})
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL_SECONDS
    uploaded = preuploaded
    verifying: str | None = None
    verified = 0
    try:
        while True:
            future = pending.future
            if future is not None and not future.done():
                # Wake as soon as the upload ends, but poll at least every ``polling`` seconds.
                wait([future], timeout=min(polling, max(0.0, deadline - time.monotonic())))
            if future is not None and future.done():
                uploaded = preuploaded + future.result()  # re-raises its error
                if verifying is None:
                    verifying = f"{VERIFYING} {res.name}"
                    progress.phase_start(verifying, pending.upload_bytes)
            current = get_version(ctx, res.kind, res.id)
            state = current.state
            if verifying is not None:
                stored = (
                    pending.upload_bytes
                    if state == ResourceState.READY
                    else _stored_bytes(ctx, res.id)
                )
                progress.advance(verifying, stored - verified)
                verified = stored
            if state == ResourceState.READY:
                ctx.store.drop_upload_units(ctx.server_id, res.id)
                if pending.future is not None or preuploaded:
                    progress.message(
                        f"{res.kind} {res.name!r}: {res.id} READY, uploaded {uploaded} bytes"
                    )
                return current.model_copy(update={"uploaded_bytes": uploaded})
            if state in (ResourceState.ERROR, ResourceState.DELETED):
                ctx.store.drop_upload_units(ctx.server_id, res.id)
                ctx.store.forget_resource(ctx.server_id, res.kind, res.checksum)
                raise ResourceError(f"{res.kind} {res.id} is {state.value}: {current.error}")
            waiting = future is None or future.done()
            failed = early.failures() if waiting and early is not None and early.sending else []
            if failed:  # what it waits for will not come; a rerun sends those files again
                raise ResourceError(f"{res.kind} {res.id} is {state.value}: {failed[0]}")
            if time.monotonic() >= deadline:
                raise AnylearnTimeoutError(
                    f"{res.kind} {res.id} not READY after {timeout} s (state {state.value})"
                )
            if pending.future is None or pending.future.done():
                time.sleep(min(interval, polling, max(0.0, deadline - time.monotonic())))
                interval *= 2
    finally:
        if verifying is not None:
            progress.phase_end(verifying)
