"""Upload the objects a server lacks: planned into units, sent on parallel streams, journaled.

The plan (deterministic, so a rerun after a crash makes the same units with the same keys):

- files smaller than ``LARGE_FILE_BYTES`` travel packed, in uncompressed tars of about
  ``PACK_BYTES`` each (:mod:`anylearn_sdk.content.pack`);
- larger files travel alone, as ``object`` uploads; a file larger than both ``PART_BYTES`` and
  half a stream's share of the plan (:func:`part_bytes`) is cut into equal parts sent as
  partial uploads in parallel and joined by a final upload (tus §Concatenation), so one big
  file can use every stream. Files are not cut finer than that: the server hashes an object
  sent whole as it arrives, but a joined one only once it is whole, reading it again.

Each unit is one tus upload. Its URL is journaled in the local store right after the server
creates it and before any byte is sent, so a process killed at any moment leaves either no
upload (nothing was sent) or a journaled one that the next run resumes from the server's
offset: no unit is ever sent twice, and an interrupted stream re-sends nothing the server
acknowledged. Units run on :func:`upload_streams` threads, largest first.

Before that plan, while a folder is still being hashed, :class:`Preuploads` sends its small
files in packs as soon as a pack's worth is hashed (huggingface_hub's preupload: content
first, the version that names it after), each pack cut from the files in walk order and
stripped of what the server says the user already has (``POST /objects/missing``), so a
rerun cuts the same packs and resumes them from the same journal.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from anylearn_sdk.client.tus import Body, TusClient, UploadStopped
from anylearn_sdk.config import STREAMS_VAR, env_positive_int
from anylearn_sdk.content.hashing import ScannedFile
from anylearn_sdk.content.manifest import Manifest, build_manifest
from anylearn_sdk.content.pack import PackMember, PackReader
from anylearn_sdk.content.sources import FileSource, Source, close_archives
from anylearn_sdk.progress import UPLOADING, ProgressCallback
from anylearn_sdk.session import SdkContext
from anylearn_sdk.states import UploadState
from anylearn_sdk.wire import DigestList, MissingObjects, UploadRecord

#: Files at least this large travel alone rather than packed.
LARGE_FILE_BYTES = 8 * 1024 * 1024
#: Target size of one pack of small files.
PACK_BYTES = 64 * 1024 * 1024
#: Parts are at least this large (see :func:`part_bytes`).
PART_BYTES = 64 * 1024 * 1024


def default_streams() -> int:
    """One stream per core, between 2 and 4: on a fast link the client's CPU is the limit
    (measured: 4 streams on 2 cores send 15% less than 2); a slow link wants more streams, and
    ``ANYLEARN_UPLOAD_STREAMS`` gives them."""
    return min(4, max(2, os.cpu_count() or 2))


def upload_streams() -> int:
    """Parallel upload streams: ``ANYLEARN_UPLOAD_STREAMS``, else :func:`default_streams`.

    Raises:
        ConfigurationError: the variable is set to something other than a positive integer.
    """
    return env_positive_int(STREAMS_VAR) or default_streams()


@dataclass(frozen=True)
class SliceBody:
    """Bytes ``start`` to ``start + length`` of a source."""

    source: Source
    start: int
    length: int

    def read_at(self, offset: int, size: int) -> bytes:
        take = max(0, min(size, self.length - offset))
        return self.source.read(self.start + offset, take) if take else b""

    def read_into(self, offset: int, view: memoryview) -> int:
        take = max(0, min(len(view), self.length - offset))
        if take:
            self.source.read_into(self.start + offset, view[:take])
        return take


@dataclass
class Unit:
    """One tus upload of a plan.

    Attributes:
        key: stable name of the unit in the journal (same content, same key).
        body: the bytes.
        metadata: ``Upload-Metadata`` (``kind``, ``sha256`` and ``resource_id``).
        sha256: for a part, the object it belongs to.
        index: for a part, its position; ``count`` parts make the object.
    """

    key: str
    body: Body
    metadata: dict[str, str]
    sha256: str | None = None
    index: int = 0
    count: int = 1

    @property
    def partial(self) -> bool:
        return self.count > 1


def part_bytes(total: int, streams: int) -> int:
    """The largest part (bytes) a plan of ``total`` bytes on ``streams`` streams cuts files into.

    Half a stream's share (``total / (2 * streams)``), so that largest-first scheduling keeps
    every stream busy to the end, and at least ``PART_BYTES``: ten 100 MiB files on two streams
    travel whole, one 10 GiB file in four parts.
    """
    return max(PART_BYTES, -(-total // (2 * streams)))


def plan_units(
    resource_id: str,
    missing: list[str],
    sizes: dict[str, int],
    sources: dict[str, Source],
    streams: int = 1,
    total: int | None = None,
) -> list[Unit]:
    """Cut the ``missing`` objects into units (largest first) for ``streams`` parallel streams.

    Args:
        missing: sha256 digests the server lacks.
        sizes: sha256 → size in bytes, of each missing object (at least).
        sources: sha256 → where its bytes are.
        total: the manifest's bytes, every file counted (default: the sum of ``sizes``, then
            of every object).
    """
    # From the whole manifest's size, not the missing part's: a resumed run must cut the same
    # parts to find them in the journal.
    largest_part = part_bytes(sum(sizes.values()) if total is None else total, streams)
    units: list[Unit] = []
    small = sorted(d for d in missing if sizes[d] < LARGE_FILE_BYTES)
    pack: list[PackMember] = []
    pack_bytes = 0
    for digest in small:
        pack.append(PackMember(digest, sizes[digest], sources[digest]))
        pack_bytes += sizes[digest]
        if pack_bytes >= PACK_BYTES:
            units.append(_pack_unit(resource_id, pack))
            pack, pack_bytes = [], 0
    if pack:
        units.append(_pack_unit(resource_id, pack))
    for digest in sorted(d for d in missing if sizes[d] >= LARGE_FILE_BYTES):
        size = sizes[digest]
        meta = {"kind": "object", "sha256": digest, "resource_id": resource_id}
        count = -(-size // largest_part)
        if count == 1:
            units.append(Unit(f"object:{digest}", SliceBody(sources[digest], 0, size), meta))
            continue
        bounds = [size * i // count for i in range(count + 1)]
        for i in range(count):
            body = SliceBody(sources[digest], bounds[i], bounds[i + 1] - bounds[i])
            units.append(
                Unit(
                    f"part:{digest}:{i}/{count}",
                    body,
                    {"resource_id": resource_id},
                    sha256=digest,
                    index=i,
                    count=count,
                )
            )
    units.sort(key=lambda u: -u.body.length)
    return units


def _pack_unit(resource_id: str, members: list[PackMember]) -> Unit:
    reader = PackReader(members)
    return Unit(f"pack:{reader.key}", reader, {"kind": "pack", "resource_id": resource_id})


@dataclass
class UploadRun:
    """Send ``units`` for ``resource_id``, resuming journaled ones; see the module docstring."""

    ctx: SdkContext
    resource_id: str
    units: list[Unit]
    on_bytes: Callable[[int], None]
    streams: int = field(default_factory=upload_streams)
    #: Set to stop every stream within one chunk read (the journal keeps what was sent).
    interrupt: threading.Event = field(default_factory=threading.Event)
    _journal: dict[str, str] = field(default_factory=dict)
    _parts: dict[str, dict[int, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sent: int = 0

    def __post_init__(self) -> None:
        self._journal = self.ctx.store.upload_units(self.ctx.server_id, self.resource_id)

    @property
    def sent(self) -> int:
        """Bytes the server acknowledged so far in this run."""
        return self._sent

    def run(self) -> int:
        """Upload every unit; returns the bytes the server stored during this call.

        Raises:
            AnylearnError: a unit failed (the first failure; units not started are cancelled).
            UploadStopped: :attr:`interrupt` was set.
        """
        workers = max(1, min(self.streams, len(self.units)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anylearn-tus") as pool:
            _first_error([pool.submit(self.send, unit) for unit in self.units])
        return self._sent

    def _url_for(self, tus: TusClient, unit: Unit) -> tuple[str, int]:
        url = self._journal.get(unit.key)
        offset = tus.offset(url) if url else None
        if url is None or offset is None:
            url = tus.create(unit.body.length, unit.metadata, partial=unit.partial)
            self.ctx.store.save_upload_unit(
                self.ctx.server_id, self.resource_id, unit.key, url, unit.body.length
            )
            offset = 0
        return url, offset

    def send(self, unit: Unit) -> str:
        """Send one unit, resuming it if journaled (any thread); its tus URL."""
        if self.interrupt.is_set():
            raise UploadStopped("upload stopped")
        tus = TusClient(self.ctx.api, stop=self.interrupt)
        try:
            url, offset = self._url_for(tus, unit)
            sent = tus.upload_from(url, offset, unit.body, self.on_bytes)
        finally:
            close_archives()
        with self._lock:
            self._sent += sent
            if unit.sha256 is None:  # a pack or a whole object: nothing to join
                return url
            urls = self._parts.setdefault(unit.sha256, {})
            urls[unit.index] = url
            if len(urls) < unit.count:
                return url
        self._finalize(tus, unit.sha256, [urls[i] for i in range(unit.count)])
        return url

    def _finalize(self, tus: TusClient, sha256: str, urls: list[str]) -> None:
        key = f"final:{sha256}"
        url = self._journal.get(key)
        if url is not None and tus.offset(url) is not None:
            return
        meta = {"kind": "object", "sha256": sha256, "resource_id": self.resource_id}
        url = tus.concatenate(urls, meta)
        self.ctx.store.save_upload_unit(self.ctx.server_id, self.resource_id, key, url, 0)


def _first_error(futures: list[Future]) -> None:
    """Wait for ``futures``; at the first failure cancel those not started and raise it."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for fut in pending:
        fut.cancel()
    for fut in done:
        fut.result()


class Preuploads:
    """Small files sent in packs while their folder is still being hashed (see the module
    docstring); :meth:`add` is the ``on_hashed`` of
    :func:`~anylearn_sdk.content.manifest.build_manifest`.

    A pack leaves once ``PACK_BYTES`` of files are hashed; on its stream it first asks the
    server which of its objects the user lacks (one ``POST /objects/missing``) and sends
    only those, as a tus upload of no version (a *preupload*). Files of ``LARGE_FILE_BYTES``
    or more are left to the plan made once the version is registered.

    Use it as a context manager: leaving it on an error stops the streams (the journal,
    scoped to ``scope``, keeps what was sent). :meth:`finish` sends the last pack, waits for
    every pack to be acknowledged and returns the bytes sent. The bytes are shown as the
    progress phase ``phase``, from the first pack on. Until a pack is full nothing is done: a
    folder with less than a pack's worth to hash (unchanged, or a few files changed) is left
    to the plan made after registration, which costs fewer round trips.
    """

    def __init__(
        self,
        ctx: SdkContext,
        scope: str,
        progress: ProgressCallback,
        phase: str,
        interrupt: threading.Event | None = None,
        streams: int | None = None,
    ):
        self._ctx, self._scope, self._progress, self._phase = ctx, scope, progress, phase
        self._interrupt = interrupt or threading.Event()
        self._streams = streams or upload_streams()
        self._pool = ThreadPoolExecutor(self._streams, thread_name_prefix="anylearn-tus")
        self._run: UploadRun | None = None  # made with the first pack
        self._ended = False
        self._futures: list[Future] = []
        self._members: list[PackMember] = []
        self._bytes = 0
        self._seen: set[str] = set()
        self._urls: list[str] = []  # of the packs sent
        self._lock = threading.Lock()

    def __enter__(self) -> Preuploads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self._interrupt.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        close_archives()
        self._end_phase()

    def add(self, files: list[ScannedFile], digests: list[str]) -> None:
        """Take these hashed files; send a pack if one is full (calling thread only)."""
        for f, digest in zip(files, digests, strict=True):
            if f.size >= LARGE_FILE_BYTES or digest in self._seen:
                continue
            self._seen.add(digest)
            self._members.append(PackMember(digest, f.size, FileSource(f.abspath, f.size)))
            self._bytes += f.size
            if self._bytes >= PACK_BYTES:
                self._flush()

    @property
    def sending(self) -> bool:
        """True once a pack has left."""
        return self._run is not None

    @property
    def digests(self) -> frozenset[str]:
        """The objects these preuploads bring (after :meth:`close`): a version registered
        meanwhile lists them missing until they are stored, and they are not sent again."""
        return frozenset(self._seen) if self._run is not None else frozenset()

    def close(self) -> None:
        """No more files: the last pack leaves if a pack was sent (else nothing is sent early,
        and the files are left to the plan made after registration)."""
        if self._run is not None and self._members:
            self._flush()
        self._members, self._bytes = [], 0

    def finish(self) -> int:
        """:meth:`close`, then wait until every pack is acknowledged; the bytes sent (again
        at each call).

        Raises:
            AnylearnError: a pack failed (the first failure).
            UploadStopped: the interrupt was set.
        """
        self.close()
        if self._run is None:
            return 0
        _first_error(self._futures)
        if not self._ended:
            self._end_phase()
            self._ctx.store.drop_upload_units(self._ctx.server_id, self._scope)
        return self._run.sent

    def failures(self) -> list[str]:
        """Why preuploads the server refused failed (one line each; empty if none did). Their
        objects then never arrive, so a version waiting for them must not wait on."""
        if not self._urls:
            return []
        ours = {url.rstrip("/").rsplit("/", 1)[-1] for url in self._urls}
        return [
            f"preupload {u.id} failed: {u.error}"
            for u in self._ctx.api.call("GET", "/uploads", list[UploadRecord])
            if u.id in ours and u.state == UploadState.FAILED
        ]

    def _flush(self) -> None:
        if self._run is None:
            self._progress.phase_start(self._phase, None)
            self._run = UploadRun(
                self._ctx,
                self._scope,
                [],
                lambda n: self._progress.advance(self._phase, n),
                streams=self._streams,
                interrupt=self._interrupt,
            )
        members, self._members, self._bytes = self._members, [], 0
        self._futures.append(self._pool.submit(self._send_pack, members))

    def _end_phase(self) -> None:
        if self._run is not None and not self._ended:
            self._progress.phase_end(self._phase)
            self._ended = True

    def _send_pack(self, members: list[PackMember]) -> None:
        body = DigestList.model_construct(digests=[m.sha256 for m in members])
        lacking = set(self._ctx.api.call("POST", "/objects/missing", MissingObjects, body).missing)
        members = [m for m in members if m.sha256 in lacking]
        if members and self._run is not None:
            reader = PackReader(members)
            url = self._run.send(Unit(f"pack:{reader.key}", reader, {"kind": "pack"}))
            with self._lock:
                self._urls.append(url)


def preuploads_for(
    ctx: SdkContext,
    folder: Path | None,
    progress: ProgressCallback,
    name: str,
    interrupt: threading.Event | None = None,
) -> Preuploads:
    """The :class:`Preuploads` of ``folder`` (None: an archive, whose files are not sent
    early), its journal scoped to the folder; ``name`` names the version in the ``uploading``
    phase."""
    scope = f"preupload:{folder.resolve() if folder else ''}"
    return Preuploads(ctx, scope, progress, f"{UPLOADING} {name}", interrupt=interrupt)


def build_and_preupload(
    ctx: SdkContext,
    folder: Path,
    progress: ProgressCallback,
    name: str,
    early: Preuploads,
) -> Manifest:
    """:func:`~anylearn_sdk.content.manifest.build_manifest` of ``folder`` with its small
    files preuploaded as they are hashed by ``early`` (:func:`preuploads_for`); its last pack
    has left when this returns, and the version can be registered while they travel."""
    manifest = build_manifest(folder, ctx.store, progress, label=folder.name, on_hashed=early.add)
    early.close()
    if early.sending and manifest.delta() is None:
        manifest.wire()  # the registration's body, made while the last packs travel
    return manifest
