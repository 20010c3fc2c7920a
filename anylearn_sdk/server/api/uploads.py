"""tus 1.0 resumable uploads: core, creation, termination, checksum, concatenation, expiration.

Protocol: https://tus.io/protocols/resumable-upload (sections cited below as "tus §...").
An upload's bytes are appended to ``uploads/<id>``; its offset is the file's size, so a
request cut off mid-body keeps every byte that reached the disk and the client resumes from
``HEAD``'s ``Upload-Offset`` (tus §Core Protocol, "HEAD"). A PATCH carrying
``Upload-Checksum`` is all-or-nothing: a partial or mismatching body is discarded (tus
§Checksum, status 460). The event loop only receives; bytes are written and hashed on worker
threads in ``WRITE_BLOCK_BYTES`` blocks, one block in flight per request, so receiving and
writing overlap.

Every upload names, in its ``Upload-Metadata``, the dataset or model it belongs to
(``resource_id``) and what its bytes are (``kind``):

- ``object``: the bytes of one file of the manifest, named by ``sha256``. They are hashed as
  they arrive; when complete, the file is renamed into the object store (no copy).
- ``pack``: an uncompressed tar whose members are named by their sha256. Its bytes go
  straight into objects as they arrive (:class:`PackReceiver`, one per upload, kept across
  PATCHes): each member is verified and stored, the upload's file only grows to the pack's
  length, and a journal beside it lists the stored members. A restart loses the receiver; a
  pack received whole is then verified again from its journal, any other starts over at 0.
- a partial upload (``Upload-Concat: partial``, tus §Concatenation) needs no ``kind``; a
  final upload (``Upload-Concat: final;<url> <url>...``) concatenates complete partials in
  order and is then treated as its ``kind``. This lets one large file travel as parallel
  streams. Creating the same final again answers the existing one (a client that crashed
  before recording its URL can resume).

A ``pack`` may leave out ``resource_id``: a *preupload* (huggingface_hub's term), sent while
its client is still hashing the folder, before the version exists. Its members are checked
against their names only (any size); once stored they are the uploader's objects, struck off
the missing objects of the uploader's versions still UPLOADING
(:func:`~anylearn_sdk.server.api.resources.objects_arrived`).

Nothing counts until verified: a version becomes READY once every object of its manifest is
in the store, and ERROR if any of its uploads fails verification. An upload expires
``upload_expiry`` seconds after its last byte arrived (tus §Expiration, ``Upload-Expires``);
an expired one answers 410 for one sweep period (:func:`sweep_seconds`), then it is swept
with its bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import secrets
import tarfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from anylearn_sdk.server.api.resources import (
    add_refs,
    objects_arrived,
    objects_stored,
    ready_if_complete,
)
from anylearn_sdk.server.context import DB, ApiError, Ctx, CurrentUser, ServerContext, not_found
from anylearn_sdk.server.db import MissingObject, Resource, Upload, User, as_utc, utcnow
from anylearn_sdk.server.objects import ObjectVerificationError, PackReceiver
from anylearn_sdk.states import ErrorCode, ResourceState, UploadState
from anylearn_sdk.wire import (
    API_PREFIX,
    TUS_CHECKSUM_ALGORITHMS,
    TUS_VERSION,
    UPLOAD_STATE_HEADER,
    UploadRecord,
)

log = logging.getLogger(__name__)
#: How often expired uploads are swept, seconds (see :func:`sweep_seconds`).
UPLOAD_SWEEP_SECONDS = 600.0
#: Uploads up to this many bytes are answered only once stored (see :func:`append`).
ANSWER_STORED_BYTES = 4 * 1024 * 1024
router = APIRouter(prefix="/uploads", tags=["uploads"])

TUS_EXTENSIONS = "creation,termination,checksum,concatenation,expiration"
#: Largest upload accepted, bytes (tus §Creation, ``Tus-Max-Size``).
TUS_MAX_SIZE = 1024**4
TUS_HEADERS = {"Tus-Resumable": TUS_VERSION}
#: ``Upload-Checksum`` algorithm name → hashlib constructor (tus §Checksum).
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
#: Bytes gathered from the request stream before one write on a worker thread.
WRITE_BLOCK_BYTES = 4 * 1024 * 1024
#: At most this many buffers per ``writev`` (POSIX guarantees 16, Linux allows 1024).
WRITEV_CHUNKS = 512
KINDS = ("object", "pack")
#: A PATCH whose body stalls this long (seconds) ends as if the client hung up.
BODY_IDLE_SECONDS = 30.0

RECEIVING, COMPLETE, VERIFYING, STORED, FAILED, CONSUMED = (
    UploadState.RECEIVING,
    UploadState.COMPLETE,
    UploadState.VERIFYING,
    UploadState.STORED,
    UploadState.FAILED,
    UploadState.CONSUMED,
)

_locks: dict[str, asyncio.Lock] = {}
#: upload id → (offset covered, running sha256) of ``object`` uploads, so a complete object
#: is verified without reading it again. Lost on restart; the file is then hashed once.
_object_hashers: dict[str, tuple[int, hashlib._Hash]] = {}
#: upload id → the receiver storing a ``pack`` upload's members as they arrive. Lost on
#: restart (or when a PATCH is cut back); the complete pack is then read again from disk.
_pack_receivers: dict[str, PackReceiver] = {}
_hashers_lock = threading.Lock()
#: resource id → (sha256 → size) of its manifest, for the pack receivers of its uploads; a
#: version's manifest never changes, so the few most recent are kept.
_manifest_sizes: dict[str, dict[str, int]] = {}
MANIFESTS_KEPT = 8


def _tus_error(status: int, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ApiError:
    return ApiError(status, code, message)


def parse_metadata(header: str | None) -> dict[str, str]:
    """Decode ``Upload-Metadata``: comma-separated ``key base64value`` pairs (tus §Creation)."""
    result: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in (header or "").split(","))):
        key, _, value = pair.partition(" ")
        try:
            result[key] = base64.b64decode(value, validate=True).decode("utf-8") if value else ""
        except (binascii.Error, UnicodeDecodeError) as err:
            raise _tus_error(400, f"Upload-Metadata value of {key!r} is not base64") from err
    return result


def _check_version(request: Request) -> None:
    """tus §Core "Tus-Resumable": a request of another version is refused with 412, which
    carries ``Tus-Version`` (added to every error of this router, see ``app._error``)."""
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise ApiError(412, ErrorCode.BAD_REQUEST, f"Tus-Resumable must be {TUS_VERSION}")


def upload_path(ctx: ServerContext, upload_id: str) -> Path:
    return ctx.paths.uploads / upload_id


def journal_path(ctx: ServerContext, upload_id: str) -> Path:
    """The members a pack's receiver stored (:class:`PackReceiver`'s journal). While it exists
    the upload's file holds no bytes, only its length: they went straight into objects."""
    return ctx.paths.uploads / f"{upload_id}.members"


def _location(upload_id: str) -> str:
    return f"{API_PREFIX}/uploads/{upload_id}"


def _expires_header(upload: Upload) -> dict[str, str]:
    return {"Upload-Expires": format_datetime(as_utc(upload.expires_at), usegmt=True)}


def _owned_upload(session: Session, user: User, upload_id: str) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.owner_id != user.id:
        raise not_found("upload", upload_id)
    if as_utc(upload.expires_at) <= utcnow():
        raise ApiError(410, ErrorCode.NOT_FOUND, f"upload {upload_id!r} expired")
    return upload


def _uploading_resource(session: Session, user: User, resource_id: str) -> Resource:
    res = session.get(Resource, resource_id)
    if res is None or res.owner_id != user.id or res.state == ResourceState.DELETED:
        raise not_found("resource", resource_id)
    if res.state != ResourceState.UPLOADING:
        raise ApiError(
            409, ErrorCode.CONFLICT, f"{res.kind} {res.id} is {res.state}, not UPLOADING"
        )
    return res


def _check_kind(res: Resource, metadata: dict[str, str], length: int) -> None:
    kind = metadata.get("kind")
    if kind not in KINDS:
        raise _tus_error(400, f"Upload-Metadata kind must be one of {', '.join(KINDS)}")
    if kind == "object":
        sha256 = metadata.get("sha256", "")
        sizes = {row[3]: row[1] for row in res.rows()}
        if sha256 not in sizes:
            raise _tus_error(400, f"object {sha256!r} is not in the manifest of {res.id}")
        if sizes[sha256] != length:
            raise _tus_error(400, f"object {sha256} is {sizes[sha256]} bytes, not {length}")


@router.options("")
def tus_options() -> Response:
    """Server capabilities (tus §Core Protocol, OPTIONS)."""
    return Response(
        status_code=204,
        headers={
            **TUS_HEADERS,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Checksum-Algorithm": ",".join(TUS_CHECKSUM_ALGORITHMS),
            "Tus-Max-Size": str(TUS_MAX_SIZE),
        },
    )


def _parse_final(header: str, session: Session, user: User) -> list[Upload]:
    """The partial uploads named by ``Upload-Concat: final;<url> <url>...``, in order."""
    urls = header.removeprefix("final;").split()
    if not urls:
        raise _tus_error(400, "Upload-Concat final names no partial uploads")
    parts = []
    for url in urls:
        part_id = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
        part = _owned_upload(session, user, part_id)
        if part.concat != "partial":
            raise _tus_error(400, f"upload {part_id} is not a partial upload")
        parts.append(part)
    return parts


@router.post("", status_code=201)
def create_upload(request: Request, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Create an upload (tus §Creation, §Concatenation).

    Metadata: ``resource_id`` (left out for a preupload: a ``pack`` that is not partial);
    ``kind`` (``object`` with ``sha256``, or ``pack``) unless the upload is partial. A final
    upload answers 201 with its parts concatenated and verification started; if the same
    parts were already concatenated, the existing final.
    """
    _check_version(request)
    metadata = parse_metadata(request.headers.get("upload-metadata"))
    concat_header = request.headers.get("upload-concat", "")
    # A pack (whole, not partial) that names no version is a preupload.
    preupload = metadata.get("kind") == "pack" and "resource_id" not in metadata
    res = None
    if not preupload or concat_header:
        res = _uploading_resource(session, user, metadata.get("resource_id", ""))
    now = utcnow()
    expires = now + timedelta(seconds=ctx.upload_expiry)
    if concat_header.startswith("final;") and res is not None:
        parts = _parse_final(concat_header, session, user)
        consumed_by = {p.parts[0] if p.state == CONSUMED and p.parts else None for p in parts}
        if len(consumed_by) == 1 and None not in consumed_by:
            final = session.get(Upload, consumed_by.pop())
            if final is not None and [p.id for p in parts] == final.parts:
                return _created(final)
        for p in parts:
            if p.state != COMPLETE or p.resource_id != res.id:
                raise _tus_error(400, f"partial upload {p.id} is not complete for {res.id}")
        length = sum(p.length for p in parts)
        _check_kind(res, metadata, length)
        final = Upload(
            id=secrets.token_hex(16),
            owner_id=user.id,
            length=length,
            metadata_json=metadata,
            resource_id=res.id,
            state=VERIFYING,
            concat="final",
            parts=[p.id for p in parts],
            expires_at=expires,
        )
        for p in parts:
            p.state, p.parts = CONSUMED, [final.id]
        session.add(final)
        session.commit()
        ctx.scheduler.background.submit(process_upload, ctx, final.id)
        return _created(final)
    length = _upload_length(request)
    partial = concat_header == "partial"
    if concat_header and not partial:
        raise _tus_error(400, "Upload-Concat must be 'partial' or 'final;<urls>'")
    if not partial and res is not None:
        _check_kind(res, metadata, length)
    upload = Upload(
        id=secrets.token_hex(16),
        owner_id=user.id,
        length=length,
        metadata_json=metadata,
        resource_id=res.id if res is not None else None,
        state=RECEIVING,
        concat="partial" if partial else None,
        expires_at=expires,
    )
    upload_path(ctx, upload.id).touch()
    session.add(upload)
    session.commit()
    if length == 0:
        _complete(ctx, session, upload)
    return _created(upload)


def _upload_length(request: Request) -> int:
    try:
        length = int(request.headers["upload-length"])
    except (KeyError, ValueError) as err:
        raise _tus_error(400, "Upload-Length header is required (bytes)") from err
    if length < 0 or length > TUS_MAX_SIZE:
        raise _tus_error(413, f"Upload-Length {length} is outside 0..{TUS_MAX_SIZE}")
    return length


def _created(upload: Upload) -> Response:
    return Response(
        status_code=201,
        headers={
            **TUS_HEADERS,
            **_expires_header(upload),
            "Location": _location(upload.id),
            "Upload-Offset": "0" if upload.state == RECEIVING else str(upload.length),
        },
    )


def _offset(ctx: ServerContext, upload: Upload) -> int:
    if upload.state != RECEIVING:
        return upload.length
    return upload_path(ctx, upload.id).stat().st_size


@router.head("/{upload_id}")
def upload_offset(upload_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Current offset (tus §Core Protocol, HEAD); ``X-Anylearn-Upload-State`` tells the rest."""
    upload = _owned_upload(session, user, upload_id)
    headers = {
        **TUS_HEADERS,
        **_expires_header(upload),
        "Upload-Offset": str(_offset(ctx, upload)),
        "Upload-Length": str(upload.length),
        "Cache-Control": "no-store",
        UPLOAD_STATE_HEADER: upload.state,
    }
    if upload.concat == "partial":
        headers["Upload-Concat"] = "partial"
    elif upload.concat == "final":
        headers["Upload-Concat"] = "final;" + " ".join(_location(p) for p in upload.parts or [])
    return Response(status_code=200, headers=headers)


@router.get("", response_model=list[UploadRecord])
def list_uploads(
    user: CurrentUser, session: DB, ctx: Ctx, resource_id: str | None = None
) -> list[UploadRecord]:
    """The uploads of a dataset or model, or without ``resource_id`` the user's preuploads
    (not part of tus): state, offset and bytes received."""
    version = (
        Upload.resource_id.is_(None) if resource_id is None else Upload.resource_id == resource_id
    )
    rows = session.scalars(
        select(Upload).where(Upload.owner_id == user.id, version).order_by(Upload.created_at)
    )
    return [
        UploadRecord(
            id=u.id,
            state=u.state,
            concat=u.concat,
            kind=u.metadata_json.get("kind"),
            length=u.length,
            offset=_offset(ctx, u) if upload_path(ctx, u.id).exists() else u.length,
            received_bytes=u.received_bytes,
            error=u.error,
            expires_at=u.expires_at,
        )
        for u in rows
    ]


def _parse_checksum(header: str | None) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64 digest>`` → (algorithm, digest) (tus §Checksum)."""
    if header is None:
        return None
    algorithm, _, value = header.partition(" ")
    if algorithm not in CHECKSUMS:
        raise _tus_error(
            400,
            f"checksum algorithm {algorithm!r} is not supported; "
            f"use one of {', '.join(TUS_CHECKSUM_ALGORITHMS)}",
        )
    try:
        return algorithm, base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise _tus_error(400, "Upload-Checksum value is not base64") from err


def manifest_sizes(ctx: ServerContext, resource_id: str) -> dict[str, int]:
    """sha256 → size of every object of the version's manifest (cached, see above)."""
    with _hashers_lock:
        sizes = _manifest_sizes.get(resource_id)
    if sizes is None:
        with ctx.sessions() as session:
            res = session.get(Resource, resource_id)
            sizes = {row[3]: row[1] for row in (res.rows() if res else [])}
        with _hashers_lock:
            _manifest_sizes[resource_id] = sizes
            while len(_manifest_sizes) > MANIFESTS_KEPT:
                _manifest_sizes.pop(next(iter(_manifest_sizes)))
    return sizes


class VersionSizes(Mapping[str, int]):
    """sha256 → size of a version's objects for a pack receiver: those it lacks from one
    small query (``resource_missing``); the whole manifest (:func:`manifest_sizes`) only if a
    pack holds another (one sent again after its objects were stored)."""

    def __init__(self, ctx: ServerContext, resource_id: str):
        self._ctx, self._resource_id = ctx, resource_id
        with ctx.sessions() as session:
            found = session.execute(
                select(MissingObject.sha256, MissingObject.size).where(
                    MissingObject.resource_id == resource_id
                )
            )
            self._lacking = {digest: size for digest, size in found if size is not None}

    def _all(self) -> dict[str, int]:
        return manifest_sizes(self._ctx, self._resource_id)

    def __getitem__(self, digest: str) -> int:
        size = self._lacking.get(digest)
        return size if size is not None else self._all()[digest]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _take_receiver(ctx: ServerContext, upload: Upload, start: int) -> PackReceiver | None:
    """The receiver to go on with at ``start``: the one that consumed the bytes before it,
    or a new one at 0; None for a pack whose bytes are kept in its file (one received before
    streaming packs existed)."""
    with _hashers_lock:
        receiver = _pack_receivers.pop(upload.id, None)
    if receiver is not None and receiver.offset == start:
        return receiver
    if receiver is not None:  # pragma: no cover - offsets and receivers move together
        receiver.close()
    if start != 0:
        return None
    journal = journal_path(ctx, upload.id)
    journal.unlink(missing_ok=True)
    sizes = VersionSizes(ctx, upload.resource_id) if upload.resource_id else None
    return PackReceiver(ctx.objects, sizes, journal)


def _drop_receiver(upload_id: str) -> None:
    with _hashers_lock:
        receiver = _pack_receivers.pop(upload_id, None)
    if receiver is not None:
        receiver.close()


class _Sink:
    """Appends one PATCH body to an upload's file on worker threads, hashing as it goes, and
    for a pack, storing its members as they arrive (:class:`PackReceiver`)."""

    def __init__(
        self,
        ctx: ServerContext,
        fd: int,
        start: int,
        upload: Upload,
        checksum_algorithm: str | None,
    ):
        self.fd = fd
        self.start = start
        self.written = 0
        self.checksum = CHECKSUMS[checksum_algorithm]() if checksum_algorithm else None
        self.object_hash: hashlib._Hash | None = None
        self.receiver: PackReceiver | None = None
        kind = upload.metadata_json.get("kind") if upload.concat is None else None
        if kind == "object":
            with _hashers_lock:
                covered, hasher = _object_hashers.pop(upload.id, (0, hashlib.sha256()))
            if covered == start:
                self.object_hash = hasher
        elif kind == "pack":
            self.receiver = _take_receiver(ctx, upload, start)

    def write(self, chunks: list[bytes]) -> None:
        """Append ``chunks`` with ``writev`` (no joining copy), hashing each. A pack's bytes
        go to its receiver instead; the file only grows to their length (sparse), so the
        upload's offset is still the file's size."""
        if self.receiver is not None:
            for chunk in chunks:
                self.receiver.feed(chunk)
                self.written += len(chunk)
            os.ftruncate(self.fd, self.start + self.written)
            return
        for i in range(0, len(chunks), WRITEV_CHUNKS):
            pending = [memoryview(c) for c in chunks[i : i + WRITEV_CHUNKS]]
            while pending:
                n = os.writev(self.fd, pending)
                while pending and n >= len(pending[0]):
                    n -= len(pending.pop(0))
                if n:
                    pending[0] = pending[0][n:]
        for chunk in chunks:
            self.written += len(chunk)
            if self.checksum is not None:
                self.checksum.update(chunk)
            if self.object_hash is not None:
                self.object_hash.update(chunk)

    def keep(self, upload_id: str) -> None:
        """Keep the running hash or receiver for the upload's next PATCH (or completion)."""
        with _hashers_lock:
            if self.object_hash is not None:
                _object_hashers[upload_id] = (self.start + self.written, self.object_hash)
            if self.receiver is not None:
                _pack_receivers[upload_id] = self.receiver

    def cut_back(self, ctx: ServerContext, upload_id: str) -> None:
        """Forget this body: the file goes back to where the body started, or for a pack, to
        0 (its receiver consumed the body and cannot step back; the client, told the offset
        by HEAD, sends the pack again)."""
        if self.receiver is None:
            os.ftruncate(self.fd, self.start)
            return
        self.receiver.close()
        os.ftruncate(self.fd, 0)
        journal_path(ctx, upload_id).unlink(missing_ok=True)


async def _receive(request: Request, sink: _Sink, limit: int, pool) -> bool:
    """Stream the body into ``sink``; returns False if the client hung up mid-body.

    A body that stalls for ``BODY_IDLE_SECONDS`` ends as a hang-up: a half-open connection must
    not hold an upload's lock forever. The deadline is moved on each chunk (one timer for the
    whole body, not one per chunk) and paused while a block is being written.
    """
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    held = 0
    pending: asyncio.Future | None = None
    disconnected = False
    try:
        async with asyncio.timeout(loop.time() + BODY_IDLE_SECONDS) as idle:
            async for chunk in request.stream():
                if sink.written + held + len(chunk) > limit:
                    raise _tus_error(400, "body runs past Upload-Length")
                chunks.append(chunk)
                held += len(chunk)
                if held >= WRITE_BLOCK_BYTES:
                    if pending is not None:
                        idle.reschedule(None)
                        await pending
                    pending = loop.run_in_executor(pool, sink.write, chunks)
                    chunks, held = [], 0
                idle.reschedule(loop.time() + BODY_IDLE_SECONDS)
    except (ClientDisconnect, TimeoutError):
        disconnected = True
    finally:
        if pending is not None:
            await pending
    if chunks:
        await loop.run_in_executor(pool, sink.write, chunks)
    return not disconnected


@router.patch("/{upload_id}")
async def append(upload_id: str, request: Request, user: CurrentUser, session: DB, ctx: Ctx):
    """Append bytes at ``Upload-Offset`` (tus §Core Protocol, PATCH)."""
    _check_version(request)
    upload = _owned_upload(session, user, upload_id)
    if request.headers.get("content-type") != "application/offset+octet-stream":
        raise _tus_error(415, "Content-Type must be application/offset+octet-stream")
    if upload.concat == "final":
        raise ApiError(403, ErrorCode.FORBIDDEN, "a final upload cannot be patched")
    expected = _parse_checksum(request.headers.get("upload-checksum"))
    lock = _locks.setdefault(upload.id, asyncio.Lock())
    if lock.locked():
        raise ApiError(423, ErrorCode.CONFLICT, f"upload {upload.id} is being written")
    async with lock:
        path = upload_path(ctx, upload.id)
        start = _offset(ctx, upload)
        try:
            claimed = int(request.headers["upload-offset"])
        except (KeyError, ValueError) as err:
            raise _tus_error(400, "Upload-Offset header is required") from err
        if claimed != start:
            raise ApiError(409, ErrorCode.CONFLICT, f"Upload-Offset {claimed} != offset {start}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        sink = _Sink(ctx, fd, start, upload, expected[0] if expected else None)
        try:
            whole = await _receive(request, sink, upload.length - start, ctx.io)
            bad_checksum = expected is not None and (
                not whole or sink.checksum is None or sink.checksum.digest() != expected[1]
            )
            if bad_checksum:
                sink.cut_back(ctx, upload.id)
            else:
                sink.keep(upload.id)
        except ApiError:
            sink.cut_back(ctx, upload.id)
            raise
        finally:
            os.close(fd)
            _locks.pop(upload.id, None)
            upload.received_bytes += sink.written
            upload.expires_at = utcnow() + timedelta(seconds=ctx.upload_expiry)
            session.commit()
        if bad_checksum and whole:
            raise ApiError(460, ErrorCode.BAD_REQUEST, "Upload-Checksum mismatch")
    offset = path.stat().st_size
    if offset == upload.length and upload.state == RECEIVING:
        job = _complete(ctx, session, upload)
        if job is not None and upload.length <= ANSWER_STORED_BYTES:
            # A small upload is answered once stored: it was verified while it arrived, so
            # what is left is a flush of its few files and the bookkeeping, and the client's
            # next poll sees the version READY. A large one is flushed on the worker while its
            # stream sends the next (syncfs would hold the stream). A client that goes away
            # does not stop the job.
            await asyncio.wrap_future(job)
    return Response(
        status_code=204,
        headers={**TUS_HEADERS, **_expires_header(upload), "Upload-Offset": str(offset)},
    )


def _complete(ctx: ServerContext, session: Session, upload: Upload) -> Future | None:
    """All bytes are in: a partial waits for its final (None); anything else is verified and
    stored on a worker thread (its future)."""
    if upload.concat == "partial":
        upload.state = COMPLETE
        session.commit()
        return None
    upload.state = VERIFYING
    session.commit()
    return ctx.scheduler.background.submit(process_upload, ctx, upload.id)


@router.delete("/{upload_id}", status_code=204)
def terminate(upload_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Discard an upload (tus §Termination)."""
    upload = _owned_upload(session, user, upload_id)
    if upload.state == VERIFYING:
        raise ApiError(409, ErrorCode.CONFLICT, f"upload {upload_id} is being verified")
    _forget(ctx, session, upload)
    session.commit()
    return Response(status_code=204, headers=TUS_HEADERS)


def _forget(ctx: ServerContext, session: Session, upload: Upload) -> None:
    upload_path(ctx, upload.id).unlink(missing_ok=True)
    journal_path(ctx, upload.id).unlink(missing_ok=True)
    with _hashers_lock:
        _object_hashers.pop(upload.id, None)
    _drop_receiver(upload.id)
    session.delete(upload)


def ingest_pack(ctx: ServerContext, pack: Path, sizes: dict[str, int]) -> list[str]:
    """Verify and store every member of a complete pack read from disk; returns their digests.
    (The way a pack is stored when no receiver followed its bytes: a final upload joined from
    parts.) The file is fed to a :class:`PackReceiver`, so both ways check the same things.

    Args:
        sizes: sha256 → size of every object of the version's manifest.

    Raises:
        ValueError: a member is not a regular file, is not named by a sha256 the manifest lists,
            has the wrong size, or its bytes do not hash to its name; or the pack ends early.
    """
    receiver = PackReceiver(ctx.objects, sizes)
    try:
        with open(pack, "rb", buffering=0) as f:
            while (block := f.read(WRITE_BLOCK_BYTES)) and receiver.gave_up is None:
                receiver.feed(block)
    finally:
        receiver.close()
    if not receiver.complete:
        raise ValueError(receiver.gave_up or "pack ends before its end-of-archive marker")
    return receiver.stored


def _store_pack(ctx: ServerContext, upload: Upload, path: Path) -> list[str]:
    """The digests of a complete pack's members, all verified and in the store: those its
    receiver stored as the bytes arrived, or, if none followed every byte, read from disk."""
    with _hashers_lock:
        receiver = _pack_receivers.pop(upload.id, None)
    if receiver is not None and receiver.complete and receiver.offset == upload.length:
        return receiver.stored
    if receiver is not None:
        receiver.close()
    if journal_path(ctx, upload.id).exists():  # the bytes went to the receiver only
        raise ValueError(receiver.gave_up if receiver and receiver.gave_up else "pack incomplete")
    if upload.resource_id is None:  # pragma: no cover - a preupload's bytes go to its receiver
        raise ValueError(f"preupload {upload.id} was not received as it streamed")
    return ingest_pack(ctx, path, manifest_sizes(ctx, upload.resource_id))


def _assemble(ctx: ServerContext, session: Session, final: Upload) -> Path:
    """Concatenate a final upload's partials, in order, into its own file (tus §Concatenation).

    The other parts are appended to the first part's file, which is then renamed; the first
    part is cut back to its length beforehand, so a run interrupted by a restart starts over.
    """
    target = upload_path(ctx, final.id)
    part_ids = final.parts or []
    if target.exists() and target.stat().st_size == final.length:
        return target  # assembled before a restart
    rows = [session.get(Upload, part_id) for part_id in part_ids]
    first = upload_path(ctx, part_ids[0])
    os.truncate(first, rows[0].length)
    with open(first, "ab") as out:
        for part_id in part_ids[1:]:
            with open(upload_path(ctx, part_id), "rb") as src:
                while block := src.read(WRITE_BLOCK_BYTES):
                    out.write(block)
    os.replace(first, target)
    for part_id, row in zip(part_ids, rows, strict=True):
        upload_path(ctx, part_id).unlink(missing_ok=True)
        row.state = STORED
    return target


def recover_packs(ctx: ServerContext) -> None:
    """At start, before :func:`resume_verification`: the packs whose bytes went straight into
    objects lost their receivers. One the stopped server had received whole, with a journal
    that ends and whose objects verify, is verified again from its journal; any other starts
    over at offset 0 (HEAD tells its client, which sends that pack again)."""
    with ctx.sessions() as session:
        for journal in ctx.paths.uploads.glob("*.members"):
            upload = session.get(Upload, journal.name.split(".")[0])
            if upload is None:
                journal.unlink()
                continue
            if upload.state == VERIFYING:
                receiver = PackReceiver.from_journal(ctx.objects, journal, upload.length)
                if receiver is not None:
                    with _hashers_lock:
                        _pack_receivers[upload.id] = receiver
                    continue
            journal.unlink()
            with open(upload_path(ctx, upload.id), "ab") as f:
                f.truncate(0)
            if upload.state == VERIFYING:
                upload.state = RECEIVING
            log.info("pack upload %s starts over: its bytes were lost in a restart", upload.id)
        session.commit()


def resume_verification(ctx: ServerContext) -> None:
    """At start: verify again the uploads a stopped server was verifying."""
    with ctx.sessions() as session:
        pending = list(session.scalars(select(Upload.id).where(Upload.state == VERIFYING)))
    for upload_id in pending:
        ctx.scheduler.background.submit(process_upload, ctx, upload_id)


def process_upload(ctx: ServerContext, upload_id: str) -> None:
    """Worker-thread job for a complete upload: verify its objects and store them."""
    with ctx.sessions() as session:
        upload = session.get(Upload, upload_id)
        if upload is None or upload.state != VERIFYING:
            return
        res = session.get(Resource, upload.resource_id) if upload.resource_id else None
        try:
            path = _assemble(ctx, session, upload) if upload.concat == "final" else None
            path = path or upload_path(ctx, upload.id)
            if upload.metadata_json.get("kind") == "pack":
                stored = _store_pack(ctx, upload, path)
                ctx.objects.flush(stored)  # once per pack, for all its small objects
                path.unlink(missing_ok=True)
                journal_path(ctx, upload.id).unlink(missing_ok=True)
            else:
                with _hashers_lock:
                    covered, hasher = _object_hashers.pop(upload.id, (-1, None))
                digest = hasher.hexdigest() if hasher and covered == upload.length else None
                sha256 = upload.metadata_json["sha256"]
                ctx.objects.adopt(path, sha256, upload.length, digest)
                stored = [sha256]
        except (OSError, ValueError, tarfile.TarError, ObjectVerificationError) as err:
            log.warning("upload %s for %s rejected: %s", upload_id, upload.resource_id, err)
            upload.state, upload.error = FAILED, str(err)
            if res is not None:
                res.state, res.error = ResourceState.ERROR, str(err)
            upload_path(ctx, upload.id).unlink(missing_ok=True)
            journal_path(ctx, upload.id).unlink(missing_ok=True)
        else:
            upload.state = STORED
            add_refs(session, upload.owner_id, stored)
            if res is not None:
                objects_stored(session, res.id, stored)
        session.commit()
        if upload.state == STORED and res is None:  # a preupload: versions may wait for it
            objects_arrived(session, upload.owner_id, stored)
        if upload.state != STORED or res is None:
            return
        # Uploads of one version finish on several threads at once. Each commits its objects
        # first, then counts what is left in a new transaction, with the version's row locked:
        # the one that committed last sees none left and marks the version READY. (Looking in
        # the same transaction missed the others' uncommitted deletes on PostgreSQL, and left
        # the version UPLOADING for ever.)
        res = session.get(Resource, res.id, with_for_update=True, populate_existing=True)
        ready_if_complete(session, res)
        session.commit()


def sweep_seconds(ctx: ServerContext) -> float:
    """How often expired uploads are swept (seconds): every ``UPLOAD_SWEEP_SECONDS``, or
    every ``upload_expiry`` if shorter."""
    return min(UPLOAD_SWEEP_SECONDS, ctx.upload_expiry)


def expire_uploads(ctx: ServerContext, now: datetime | None = None) -> int:
    """Delete uploads expired for at least one sweep period, and upload files no row owns.

    An expired upload answers 410 until then (tus §Expiration allows 404 or 410; 410 tells a
    resuming client that the upload it journaled expired), whenever the sweep runs. Uploads
    being verified are left alone, and so are files younger than the expiry (an upload being
    created has its file before its row). Returns the number of uploads removed.
    """
    now = now or datetime.now(UTC)
    gone_before = now - timedelta(seconds=sweep_seconds(ctx))
    removed = 0
    with ctx.sessions() as session:
        for upload in session.scalars(select(Upload).where(Upload.state != VERIFYING)):
            if as_utc(upload.expires_at) <= gone_before:
                _forget(ctx, session, upload)
                removed += 1
        session.commit()
        known = set(session.scalars(select(Upload.id)))
    cutoff = now.timestamp() - ctx.upload_expiry
    for path in ctx.paths.uploads.iterdir():
        owner = path.name.split(".")[0]  # an upload's file, or its journal
        if owner not in known and path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
    return removed
