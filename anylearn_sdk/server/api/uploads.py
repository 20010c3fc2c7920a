"""tus 1.0 resumable uploads: core, creation, termination and checksum (sha256).

Protocol: https://tus.io/protocols/resumable-upload (sections cited below as "tus §...").
An upload's bytes are appended to ``uploads/<id>``; its offset is the file's size, so a
request cut off mid-body keeps every byte that reached the disk and the client resumes from
``HEAD``'s ``Upload-Offset`` (tus §Core Protocol, "HEAD"). A PATCH carrying
``Upload-Checksum`` is all-or-nothing: a partial or mismatching body is discarded (tus
§Checksum, status 460).

The only upload kind today is ``pack``: an uncompressed tar whose members are named by their
sha256 and belong to the manifest of the dataset or model named in the ``resource_id``
metadata. When the last byte arrives the server verifies and stores every member on a worker
thread; the version then becomes READY, or ERROR if any member is bad.
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
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect

from anylearn_sdk.protocol import SHA256_HEX
from anylearn_sdk.server.api.resources import refresh_state
from anylearn_sdk.server.context import DB, ApiError, Ctx, CurrentUser, ServerContext, not_found
from anylearn_sdk.server.db import Resource, Upload
from anylearn_sdk.server.objects import ObjectVerificationError
from anylearn_sdk.states import ErrorCode, ResourceState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/uploads", tags=["uploads"])

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,termination,checksum"
#: Largest upload accepted, bytes (tus §Creation, ``Tus-Max-Size``).
TUS_MAX_SIZE = 1024**4
TUS_HEADERS = {"Tus-Resumable": TUS_VERSION}
_locks: dict[str, asyncio.Lock] = {}


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
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise ApiError(412, ErrorCode.BAD_REQUEST, f"Tus-Resumable must be {TUS_VERSION}")


def _upload_path(ctx: ServerContext, upload_id: str) -> Path:
    return ctx.paths.uploads / upload_id


def _owned_upload(session, user, upload_id: str) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.owner_id != user.id:
        raise not_found("upload", upload_id)
    return upload


@router.options("")
def tus_options() -> Response:
    """Server capabilities (tus §Core Protocol, OPTIONS)."""
    return Response(
        status_code=204,
        headers={
            **TUS_HEADERS,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Checksum-Algorithm": "sha256",
            "Tus-Max-Size": str(TUS_MAX_SIZE),
        },
    )


@router.post("", status_code=201)
def create_upload(request: Request, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Create an upload (tus §Creation). Metadata: ``kind`` = ``pack``, ``resource_id``."""
    _check_version(request)
    try:
        length = int(request.headers["upload-length"])
    except (KeyError, ValueError) as err:
        raise _tus_error(400, "Upload-Length header is required (bytes)") from err
    if length < 0 or length > TUS_MAX_SIZE:
        raise _tus_error(413, f"Upload-Length {length} is outside 0..{TUS_MAX_SIZE}")
    metadata = parse_metadata(request.headers.get("upload-metadata"))
    if metadata.get("kind") != "pack":
        raise _tus_error(400, "Upload-Metadata kind must be 'pack'")
    resource_id = metadata.get("resource_id", "")
    res = session.get(Resource, resource_id)
    if res is None or res.owner_id != user.id or res.state == ResourceState.DELETED:
        raise not_found("resource", resource_id)
    if res.state != ResourceState.UPLOADING:
        raise ApiError(
            409, ErrorCode.CONFLICT, f"{res.kind} {res.id} is {res.state}, not UPLOADING"
        )
    upload = Upload(
        id=secrets.token_hex(16),
        owner_id=user.id,
        length=length,
        metadata_json=metadata,
        resource_id=res.id,
    )
    _upload_path(ctx, upload.id).touch()
    session.add(upload)
    session.commit()
    return Response(
        status_code=201,
        headers={**TUS_HEADERS, "Location": f"/api/v1/uploads/{upload.id}", "Upload-Offset": "0"},
    )


@router.head("/{upload_id}")
def upload_offset(upload_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Current offset (tus §Core Protocol, HEAD)."""
    upload = _owned_upload(session, user, upload_id)
    offset = _upload_path(ctx, upload.id).stat().st_size
    return Response(
        status_code=200,
        headers={
            **TUS_HEADERS,
            "Upload-Offset": str(offset),
            "Upload-Length": str(upload.length),
            "Cache-Control": "no-store",
        },
    )


def _parse_checksum(header: str | None) -> bytes | None:
    if header is None:
        return None
    algorithm, _, value = header.partition(" ")
    if algorithm != "sha256":
        raise _tus_error(400, f"checksum algorithm {algorithm!r} is not supported; use sha256")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise _tus_error(400, "Upload-Checksum value is not base64") from err


@router.patch("/{upload_id}")
async def append(upload_id: str, request: Request, user: CurrentUser, session: DB, ctx: Ctx):
    """Append bytes at ``Upload-Offset`` (tus §Core Protocol, PATCH)."""
    _check_version(request)
    upload = _owned_upload(session, user, upload_id)
    if request.headers.get("content-type") != "application/offset+octet-stream":
        raise _tus_error(415, "Content-Type must be application/offset+octet-stream")
    expected_digest = _parse_checksum(request.headers.get("upload-checksum"))
    lock = _locks.setdefault(upload.id, asyncio.Lock())
    if lock.locked():
        raise ApiError(423, ErrorCode.CONFLICT, f"upload {upload.id} is being written")
    async with lock:
        path = _upload_path(ctx, upload.id)
        start = path.stat().st_size
        try:
            claimed = int(request.headers["upload-offset"])
        except (KeyError, ValueError) as err:
            raise _tus_error(400, "Upload-Offset header is required") from err
        if claimed != start:
            raise ApiError(409, ErrorCode.CONFLICT, f"Upload-Offset {claimed} != offset {start}")
        digest = hashlib.sha256()
        written = 0
        disconnected = False
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            try:
                async for chunk in request.stream():
                    if start + written + len(chunk) > upload.length:
                        os.ftruncate(fd, start)
                        raise _tus_error(400, f"body runs past Upload-Length {upload.length}")
                    os.write(fd, chunk)
                    written += len(chunk)
                    if expected_digest is not None:
                        digest.update(chunk)
            except ClientDisconnect:
                disconnected = True
            if expected_digest is not None and (disconnected or digest.digest() != expected_digest):
                os.ftruncate(fd, start)
                if not disconnected:
                    raise ApiError(460, ErrorCode.BAD_REQUEST, "Upload-Checksum mismatch")
            os.fsync(fd)
        finally:
            os.close(fd)
            _locks.pop(upload.id, None)
    offset = path.stat().st_size
    if offset == upload.length and not upload.completed:
        upload.completed = True
        session.commit()
        ctx.scheduler.background.submit(process_pack, ctx, upload.id)
    return Response(status_code=204, headers={**TUS_HEADERS, "Upload-Offset": str(offset)})


@router.delete("/{upload_id}", status_code=204)
def terminate(upload_id: str, user: CurrentUser, session: DB, ctx: Ctx) -> Response:
    """Discard an upload (tus §Termination)."""
    upload = _owned_upload(session, user, upload_id)
    _upload_path(ctx, upload.id).unlink(missing_ok=True)
    session.delete(upload)
    session.commit()
    return Response(status_code=204, headers=TUS_HEADERS)


def ingest_pack(ctx: ServerContext, pack: Path, manifest: list[dict]) -> None:
    """Verify and store every member of a pack.

    Raises:
        ValueError: a member is not a regular file, is not named by a sha256 the manifest lists,
            has the wrong size, or its bytes do not hash to its name.
    """
    sizes = {e["sha256"]: e["size"] for e in manifest}
    with tarfile.open(pack, mode="r|") as tar:
        for member in tar:
            if not member.isreg() or not SHA256_HEX.fullmatch(member.name):
                raise ValueError(f"pack member {member.name!r} is not a regular object file")
            if sizes.get(member.name) != member.size:
                raise ValueError(f"pack member {member.name} is not in the manifest at that size")
            stream = tar.extractfile(member)
            if stream is None:  # pragma: no cover - isreg() members always have data
                raise ValueError(f"pack member {member.name} has no data")
            ctx.objects.ingest(stream, member.name, member.size)


def process_pack(ctx: ServerContext, upload_id: str) -> None:
    """Worker-thread job run when a pack upload completes."""
    with ctx.sessions() as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            return
        res = session.get(Resource, upload.resource_id)
        path = _upload_path(ctx, upload_id)
        try:
            ingest_pack(ctx, path, res.manifest)
        except (ValueError, tarfile.TarError, ObjectVerificationError) as err:
            log.warning("pack %s for %s rejected: %s", upload_id, res.id, err)
            res.state = ResourceState.ERROR
            res.error = str(err)
        else:
            refresh_state(res, ctx.objects)
        path.unlink(missing_ok=True)
        session.delete(upload)
        session.commit()
