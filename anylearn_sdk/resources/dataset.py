"""Datasets and models: versions addressed by the checksum of their manifest.

Dedup, cheapest check first: the local store (checksum → id on this server, confirmed with
one GET), then the server (``?checksum=``); otherwise the manifest is registered, the server
answers which objects it lacks, and only those travel, packed in one tus upload on a worker
thread while the caller polls the version's state. An upload interrupted by the death of the
process is journaled in the local store and resumed from the server's offset next time.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from anylearn_sdk.client.tus import TusClient
from anylearn_sdk.content.manifest import Manifest
from anylearn_sdk.content.pack import PackMember, PackReader
from anylearn_sdk.errors import (
    AnylearnTimeoutError,
    InvalidArgumentError,
    NotFoundError,
    ResourceError,
)
from anylearn_sdk.progress import ProgressCallback
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


def _known(ctx: SdkContext, kind: str, checksum: str) -> dict | None:
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


@dataclass
class PendingUpload:
    """A version being uploaded: poll it with :func:`await_ready`."""

    resource: Dataset
    future: Future | None


def start_sync(
    ctx: SdkContext,
    kind: str,
    manifest: Manifest,
    name: str,
    project_id: str,
    pool: ThreadPoolExecutor,
    progress: ProgressCallback,
) -> PendingUpload:
    """Make sure the server holds ``manifest``; start uploading what it lacks on ``pool``."""
    cls = class_for(kind)
    known = _known(ctx, kind, manifest.checksum)
    if known is not None and known["state"] == ResourceState.READY:
        ctx.store.remember_resource(ctx.server_id, kind, manifest.checksum, known["id"], name)
        progress.message(
            f"{kind} {name!r}: {len(manifest.entries)} files, {manifest.total_bytes} bytes, "
            f"already on the server as {known['id']}; uploaded 0 bytes"
        )
        return PendingUpload(cls.from_json(known), None)
    data = ctx.api.post_json(
        f"/{PLURALS[kind]}",
        {
            "name": name,
            "checksum": manifest.checksum,
            "manifest": [e.to_json() for e in manifest.entries],
            "project_id": project_id,
        },
    )
    ctx.store.remember_resource(ctx.server_id, kind, manifest.checksum, data["id"], name)
    missing = data.get("missing", [])
    if not missing:
        progress.message(
            f"{kind} {name!r}: every file already on the server ({data['id']}); uploaded 0 bytes"
        )
        return PendingUpload(cls.from_json(data), None)
    sizes = {e.sha256: e.size for e in manifest.entries}
    reader = PackReader([PackMember(d, sizes[d], manifest.sources[d]) for d in missing])
    progress.message(
        f"{kind} {name!r}: uploading {len(missing)} of {len(manifest.entries)} files "
        f"({reader.length} bytes packed) as {data['id']}"
    )
    future = pool.submit(_upload, ctx, data["id"], reader, progress, f"upload {kind} {name}")
    return PendingUpload(cls.from_json(data), future)


def _upload(
    ctx: SdkContext, resource_id: str, reader: PackReader, progress: ProgressCallback, phase: str
) -> int:
    """Worker-thread body: resume a journaled upload of the same pack, or start one."""
    tus = TusClient(ctx.api)
    url = ctx.store.upload_session(ctx.server_id, resource_id, reader.key)
    if url is not None and tus.offset(url) is None:
        url = None  # expired or finished on the server
    if url is None:
        url = tus.create(reader.length, {"kind": "pack", "resource_id": resource_id})
        ctx.store.save_upload_session(ctx.server_id, resource_id, reader.key, url, reader.length)
    progress.phase_start(phase, reader.length)
    try:
        return tus.upload(url, reader, lambda n: progress.advance(phase, n))
    finally:
        progress.phase_end(phase)


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
    plural = PLURALS[res.kind]
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL_SECONDS
    uploaded = 0
    while True:
        future = pending.future
        if future is not None and not future.done():
            # Wake as soon as the upload ends, but poll at least every ``polling`` seconds.
            wait([future], timeout=min(polling, max(0.0, deadline - time.monotonic())))
        if future is not None and future.done():
            uploaded = future.result()  # re-raises the worker's error
        data = ctx.api.get_json(f"/{plural}/{res.id}", resource_id=res.id)
        state = ResourceState(data["state"])
        if state == ResourceState.READY:
            ctx.store.drop_upload_session(ctx.server_id, res.id)
            if pending.future is not None:
                progress.message(
                    f"{res.kind} {res.name!r}: {res.id} READY, uploaded {uploaded} bytes"
                )
            return replace(class_for(res.kind).from_json(data), uploaded_bytes=uploaded)
        if state in (ResourceState.ERROR, ResourceState.DELETED):
            ctx.store.drop_upload_session(ctx.server_id, res.id)
            ctx.store.forget_resource(ctx.server_id, res.kind, res.checksum)
            raise ResourceError(f"{res.kind} {res.id} is {state.value}: {data.get('error')}")
        if time.monotonic() >= deadline:
            raise AnylearnTimeoutError(
                f"{res.kind} {res.id} not READY after {timeout} s (state {state.value})"
            )
        if pending.future is None or pending.future.done():
            time.sleep(min(interval, polling, max(0.0, deadline - time.monotonic())))
            interval *= 2
