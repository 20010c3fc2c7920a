"""Datasets and models: versions addressed by the checksum of their manifest.

Dedup, cheapest check first: the local store (checksum → id on this server, confirmed with
one GET), then the server (``?checksum=``); otherwise the manifest is registered, the server
answers which objects it lacks, and only those travel (:mod:`.upload`: small files packed,
large ones alone or in parallel parts, every unit journaled for resume) on a worker thread
while the caller polls the version's state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from anylearn_sdk.client.http import raise_for_status
from anylearn_sdk.content.manifest import Manifest
from anylearn_sdk.errors import (
    AnylearnError,
    AnylearnTimeoutError,
    InvalidArgumentError,
    NotFoundError,
    ResourceError,
)
from anylearn_sdk.progress import UPLOADING, VERIFYING, ProgressCallback
from anylearn_sdk.protocol import manifest_delta
from anylearn_sdk.resources.upload import UploadRun, plan_units, upload_streams
from anylearn_sdk.session import SdkContext
from anylearn_sdk.states import ResourceState

PLURALS = {"dataset": "datasets", "model": "models"}
#: First readiness poll after an upload ends comes fast; later ones back off to the caller's
#: ``resource_polling`` interval (seconds).
FIRST_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Dataset:
    """A dataset version.

    Attributes:
        id: the backend's id.
        name: a label (versions with the same content share one id whatever their name).
        checksum: sha256 of the canonical manifest.
        state: :class:`ResourceState`.
        file_count: files in the manifest.
        total_bytes: bytes in the manifest.
        uploaded_bytes: bytes this call sent (0 when the content was already there).
    """

    id: str
    name: str
    checksum: str
    state: ResourceState
    file_count: int = 0
    total_bytes: int = 0
    uploaded_bytes: int = 0
    kind = "dataset"

    @classmethod
    def from_json(cls, data: dict, uploaded_bytes: int = 0):
        return cls(
            data["id"],
            data["name"],
            data["checksum"],
            ResourceState(data["state"]),
            data.get("file_count", 0),
            data.get("total_bytes", 0),
            uploaded_bytes,
        )


@dataclass(frozen=True)
class Model(Dataset):
    """A model version (same fields as :class:`Dataset`)."""

    kind = "model"


def class_for(kind: str) -> type[Dataset]:
    return Model if kind == "model" else Dataset


def get_ready(ctx: SdkContext, kind: str, resource_id: str, arg: str) -> Dataset:
    """An existing READY version by id.

    Raises:
        InvalidArgumentError: it does not exist, or is not READY.
    """
    try:
        data = ctx.api.get_json(f"/{PLURALS[kind]}/{resource_id}", resource_id=resource_id)
    except NotFoundError as err:
        raise InvalidArgumentError(f"{arg} {resource_id!r} not found") from err
    if data["state"] != ResourceState.READY:
        raise InvalidArgumentError(f"{arg} {resource_id!r} is {data['state']}, not READY")
    return class_for(kind).from_json(data)


def known_resource(ctx: SdkContext, kind: str, checksum: str) -> dict | None:
    """The server's version with this checksum, asking the local store first."""
    resource_id = ctx.store.remote_resource(ctx.server_id, kind, checksum)
    if resource_id is not None:
        try:
            data = ctx.api.get_json(f"/{PLURALS[kind]}/{resource_id}", resource_id=resource_id)
        except NotFoundError:
            data = None
        if data is not None and data["state"] in (ResourceState.READY, ResourceState.UPLOADING):
            return data
        ctx.store.forget_resource(ctx.server_id, kind, checksum)  # deleted or failed remotely
    found = ctx.api.get_json(f"/{PLURALS[kind]}", params={"checksum": checksum})
    ready = [d for d in found if d["state"] == ResourceState.READY]
    return ready[0] if ready else None


def last_known(ctx: SdkContext, kind: str, key: str) -> tuple[str, dict | None] | None:
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
    """

    resource: Dataset
    future: Future | None
    upload_bytes: int = 0


def start_sync(
    ctx: SdkContext,
    kind: str,
    manifest: Manifest,
    name: str,
    project_id: str | Callable[[], str],
    pool: ThreadPoolExecutor,
    progress: ProgressCallback,
    guess: Future | None = None,
) -> PendingUpload:
    """Make sure the server holds ``manifest``; start uploading what it lacks on ``pool``.

    Args:
        project_id: the project a new version is filed under, or a callable giving it (asked
            only if a new version must be registered, so an unchanged resubmit skips it).
        guess: a future of :func:`last_known`, used if it answered for this checksum.
    """
    cls = class_for(kind)
    try:
        guessed = guess.result() if guess is not None else None
    except AnylearnError:
        guessed = None  # asked again below; a lasting failure is raised there
    if guessed is not None and guessed[0] == manifest.checksum:
        known = guessed[1]
    else:
        known = known_resource(ctx, kind, manifest.checksum)
    if known is not None and known["state"] == ResourceState.READY:
        ctx.store.remember_resource(ctx.server_id, kind, manifest.checksum, known["id"], name)
        progress.message(
            f"{kind} {name!r}: {manifest.file_count} files, {manifest.total_bytes} bytes, "
            f"already on the server as {known['id']}; uploaded 0 bytes"
        )
        return PendingUpload(cls.from_json(known), None)
    data = _register(
        ctx, kind, manifest, name, project_id() if callable(project_id) else project_id
    )
    ctx.store.remember_resource(ctx.server_id, kind, manifest.checksum, data["id"], name)
    missing = data.get("missing", [])
    if not missing:
        progress.message(
            f"{kind} {name!r}: every file already on the server ({data['id']}); uploaded 0 bytes"
        )
        return PendingUpload(cls.from_json(data), None)
    sizes = {e.sha256: e.size for e in manifest.entries}
    streams = upload_streams()
    units = plan_units(data["id"], missing, sizes, manifest.sources, streams)
    total = sum(u.body.length for u in units)
    progress.message(
        f"{kind} {name!r}: uploading {len(missing)} of {manifest.file_count} files "
        f"({total} bytes in {len(units)} uploads) as {data['id']}"
    )
    phase = f"{UPLOADING} {name}"

    def upload() -> int:
        progress.phase_start(phase, total)
        try:
            run = UploadRun(
                ctx, data["id"], units, lambda n: progress.advance(phase, n), streams=streams
            )
            return run.run()
        finally:
            progress.phase_end(phase)

    return PendingUpload(cls.from_json(data), pool.submit(upload), total)


def _register(ctx: SdkContext, kind: str, manifest: Manifest, name: str, project_id: str):
    """Register the version: as a delta against the folder's previous version when the server
    has it (a few entries instead of one per file), else with the whole manifest."""
    body = {"name": name, "checksum": manifest.checksum, "project_id": project_id}
    if manifest.base is not None:
        base_checksum, base_entries = manifest.base
        changes, removed = manifest_delta(base_entries(), manifest.entries)
        response = ctx.api.request(
            "POST",
            f"/{PLURALS[kind]}",
            json={
                **body,
                "base_checksum": base_checksum,
                "changes": [e.to_json() for e in changes],
                "removed": removed,
            },
            check=False,
        )
        if response.status_code != 409:
            raise_for_status(response)
            return response.json()
    body["manifest"] = [e.to_json() for e in manifest.entries]
    return ctx.api.post_json(f"/{PLURALS[kind]}", body)


def _stored_bytes(ctx: SdkContext, resource_id: str) -> int:
    """Bytes of this version's uploads the server has verified and stored."""
    uploads = ctx.api.get_json("/uploads", params={"resource_id": resource_id})
    return sum(u["length"] for u in uploads if u["state"] == "STORED" and u["concat"] != "partial")


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
        ResourceError: the server marked it ERROR (a file failed verification).
        AnylearnTimeoutError: not READY within ``timeout`` seconds.
        AnylearnError: the upload thread failed (its error is re-raised).
    """
    res = pending.resource
    if pending.future is None and res.state == ResourceState.READY:
        return res  # known READY a moment ago; nothing was sent
    plural = PLURALS[res.kind]
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL_SECONDS
    uploaded = 0
    verifying: str | None = None
    verified = 0
    try:
        while True:
            future = pending.future
            if future is not None and not future.done():
                # Wake as soon as the upload ends, but poll at least every ``polling`` seconds.
                wait([future], timeout=min(polling, max(0.0, deadline - time.monotonic())))
            if future is not None and future.done():
                uploaded = future.result()  # re-raises the worker's error
                if verifying is None:
                    verifying = f"{VERIFYING} {res.name}"
                    progress.phase_start(verifying, pending.upload_bytes)
            data = ctx.api.get_json(f"/{plural}/{res.id}", resource_id=res.id)
            state = ResourceState(data["state"])
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
                if pending.future is not None:
                    progress.message(
                        f"{res.kind} {res.name!r}: {res.id} READY, uploaded {uploaded} bytes"
                    )
                return replace(class_for(res.kind).from_json(data), uploaded_bytes=uploaded)
            if state in (ResourceState.ERROR, ResourceState.DELETED):
                ctx.store.drop_upload_units(ctx.server_id, res.id)
                ctx.store.forget_resource(ctx.server_id, res.kind, res.checksum)
                raise ResourceError(f"{res.kind} {res.id} is {state.value}: {data.get('error')}")
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
