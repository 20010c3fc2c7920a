"""Content-addressed object store: ``objects/<aa>/<rest of sha256>``, written once, verified.

An object exists in the store only after its bytes were hashed and the digest matched the name
it was asked to have; the final ``os.replace`` makes that atomic, so a crash of the server never
leaves a half object under a valid name. A temporary file lives next to its final name, in the
same fan-out folder, under a name no object can have (a leading dot): one folder shared by
every writer serialized them on its lock (measured: 20,000 files of 50 KiB on two threads took
4x longer through one ``.tmp`` folder than in the fan-out folders), and a rename within a folder
skips the filesystem's cross-folder rename lock.

Against power loss, a large object is fsynced before its rename; the many small objects of a
pack are flushed together by :meth:`ObjectStore.flush` (``syncfs`` of the store's filesystem)
before the pack counts as stored: an fsync per 50 KiB file would cost more than receiving it,
and ``sync()`` would flush every filesystem of the machine. A pack of a few objects (one
changed file) fsyncs just those, so it does not wait on the rest of the filesystem.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

from anylearn_sdk.protocol import (
    SHA256_HEX,
    ManifestEntry,
    check_relative_path,
    normalize_mode,
)

COPY_BLOCK_BYTES = 1024 * 1024
#: A batch of at most this many objects is made durable by an fsync of each (and of their
#: folders) rather than by ``syncfs`` of the whole filesystem.
FSYNC_AT_MOST = 16
TAR_BLOCK = tarfile.BLOCKSIZE
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` to disk (``syncfs(2)``; ``sync()`` where the C
    library lacks it)."""
    call = getattr(_libc, "syncfs", None)
    if call is None:  # pragma: no cover - glibc and musl have it
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if call(fd) != 0:  # pragma: no cover - only on I/O errors
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def hash_path(path: Path) -> str:
    """sha256 of a file's bytes, read in ``COPY_BLOCK_BYTES`` blocks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(COPY_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


class ObjectVerificationError(ValueError):
    """The bytes offered for an object do not hash to its name, or have the wrong size."""


class ObjectStore:
    """Objects addressed by sha256 under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self._prefix = f"{root}{os.sep}"
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for prefix in range(256):  # every fan-out folder up front: no mkdir per object
            (root / f"{prefix:02x}").mkdir(exist_ok=True)

    def location(self, sha256: str) -> str:
        """Where object ``sha256`` is, as a string: no ``Path`` is built on the paths taken
        per object (building three cost more than the ``stat`` of a 20,000-file check).

        Raises:
            ValueError: ``sha256`` is not a lowercase hex sha256 digest.
        """
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return f"{self._prefix}{sha256[:2]}{os.sep}{sha256[2:]}"

    def path_for(self, sha256: str) -> Path:
        return Path(self.location(sha256))

    def has(self, sha256: str) -> bool:
        return os.path.isfile(self.location(sha256))

    def temp_for(self, sha256: str) -> str:
        """A temporary name beside object ``sha256``, unique to this process and thread."""
        return (
            f"{self._prefix}{sha256[:2]}{os.sep}.{sha256[2:]}.{os.getpid()}.{threading.get_ident()}"
        )

    def sweep_temporaries(self) -> int:
        """Remove the temporary files a killed server left beside objects (names starting
        with a dot, never an object's); run at start, before any upload. Returns how many."""
        removed = 0
        for prefix in range(256):
            with os.scandir(self.root / f"{prefix:02x}") as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def flush(self, digests: Collection[str] | None = None) -> None:
        """Make objects durable: these ``digests`` (a batch just stored), or every one.

        Up to :data:`FSYNC_AT_MOST` objects are fsynced one by one with their fan-out folders
        (a pack of one changed file need not wait for the whole filesystem's dirty pages);
        more, or all, with one ``syncfs`` of the store's filesystem.
        """
        if digests is None or len(digests) > FSYNC_AT_MOST:
            syncfs(self.root)
            return
        folders = set()
        for digest in digests:
            path = self.path_for(digest)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folders.add(path.parent)
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests (deduplicated, sorted) that the store does not hold."""
        return sorted({d for d in digests if not self.has(d)})

    def ingest(self, stream: BinaryIO, sha256: str, size: int) -> bool:
        """Store ``size`` bytes read from ``stream`` as object ``sha256``.

        The bytes go to a temporary file created read-only (0o444) beside the object
        (:meth:`temp_for`), which is renamed into place once its digest matched. Not flushed:
        call :meth:`flush` once for a batch.

        Returns:
            True if a new object was written, False if it was already present (the stream is
            still consumed and verified, so a pack's later members stay aligned).

        Raises:
            ObjectVerificationError: the bytes have another digest or another size.
        """
        target = self.path_for(sha256)
        digest = hashlib.sha256()
        written = 0
        present = target.is_file()
        tmp_name = self.temp_for(sha256)
        fd = -1 if present else os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            while block := stream.read(COPY_BLOCK_BYTES):
                digest.update(block)
                written += len(block)
                view = memoryview(block)
                while fd >= 0 and view:
                    view = view[os.write(fd, view) :]
            if written != size or digest.hexdigest() != sha256:
                raise ObjectVerificationError(
                    f"object {sha256} failed verification: got {written} bytes "
                    f"with sha256 {digest.hexdigest()}"
                )
            if present:
                return False
            os.close(fd)
            fd = -1
            os.replace(tmp_name, target)
            return True
        finally:
            if fd >= 0:
                os.close(fd)
            if not present:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)

    def adopt(self, path: Path, sha256: str, size: int, digest: str | None = None) -> bool:
        """Move the complete file at ``path`` into the store as object ``sha256``, without copying.

        Args:
            path: a file on the same filesystem (an upload's bytes); it is gone afterwards.
            digest: its sha256 if already computed while the bytes arrived; else it is read.

        Returns:
            True if a new object was stored, False if the store already held it.

        Raises:
            ObjectVerificationError: the file has another size or digest (it is removed).
        """
        target = self.path_for(sha256)
        try:
            actual_size = path.stat().st_size
            if digest is None and actual_size == size:
                digest = hash_path(path)
            if actual_size != size or digest != sha256:
                raise ObjectVerificationError(
                    f"object {sha256} failed verification: got {actual_size} bytes "
                    f"with sha256 {digest}"
                )
            if target.is_file():
                return False
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(path, 0o444)
            os.replace(path, target)
            return True
        finally:
            path.unlink(missing_ok=True)

    def store_file(self, path: Path) -> tuple[str, int]:
        """Copy the regular file at ``path`` into the store, hashing it on the way.

        The file is opened with ``O_NOFOLLOW``, so a symlink put in its place is refused.

        Returns:
            (sha256, size in bytes) of what was read.
        """
        digest = hashlib.sha256()
        tmp_name = self.tmp / f"copy.{threading.get_ident()}.{os.getpid()}"
        size = 0
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            with (
                os.fdopen(src, "rb", buffering=0, closefd=False) as reader,
                open(tmp_name, "wb", buffering=0) as writer,
            ):
                while block := reader.read(COPY_BLOCK_BYTES):
                    digest.update(block)
                    writer.write(block)
                    size += len(block)
                os.fsync(writer.fileno())
            sha256 = digest.hexdigest()
            os.chmod(tmp_name, 0o444)
            if not self.has(sha256):
                os.replace(tmp_name, self.path_for(sha256))
            return sha256, size
        finally:
            os.close(src)
            tmp_name.unlink(missing_ok=True)

    def store_tree(self, root: Path) -> tuple[list[ManifestEntry], list[str]]:
        """Store every regular file under ``root`` (a task's results) as objects.

        Symbolic links and special files are not followed nor stored: a task may leave a link
        to anywhere on the server.

        Returns:
            (the manifest of the stored files, the relative paths that were skipped).
        """
        entries: list[ManifestEntry] = []
        skipped: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
                path = here / name
                rel = check_relative_path(path.relative_to(root).as_posix())
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    skipped.append(rel)
                    continue
                sha256, size = self.store_file(path)
                entries.append(ManifestEntry(rel, size, normalize_mode(st.st_mode), sha256))
        entries.sort(key=lambda e: e.path)
        return entries, sorted(skipped)

    def materialize(
        self,
        manifest: Iterable[ManifestEntry],
        dest: Path,
        base: tuple[Path, Iterable[ManifestEntry]] | None = None,
        take_base: bool = False,
    ) -> None:
        """Lay out a manifest's files under ``dest`` read-only, hard-linking the stored objects.

        Built in a sibling temporary folder and renamed into place, so ``dest`` either does not
        exist or is complete (two threads may lay out the same one; the first rename wins).
        Executable files are copied (mode 0o555) since a hard link shares the object's
        read-only 0o444 mode. Folders end read-only (0o555).

        Args:
            base: an already laid-out tree and its manifest (an earlier version of the same
                data). Its links are copied in bulk (``cp -al``, one C loop) and only the files
                that differ are changed: a version that differs by a few files is laid out at
                the speed of the copy, not of a link per file from Python. Ignored when most
                files differ.
            take_base: the base tree may be moved rather than copied (nothing uses it; the
                caller makes sure nothing starts to): the layout then costs only the files
                that differ, and the base is laid out again when it is next asked for.
        """
        if dest.exists():
            return
        entries = list(manifest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        root = str(staging)
        try:
            todo = entries
            if base is not None:
                todo = self._start_from(base, entries, root, take_base)
            made = {root}
            for entry in todo:
                self._place(entry, root, made)
            for d in sorted(_folders(entries, root), key=len, reverse=True):
                os.chmod(d, 0o555)  # noqa: S103 - read-only folder
            os.rename(staging, dest)
        except OSError:
            make_writable(staging)
            shutil.rmtree(staging)
            if not dest.is_dir():
                raise
            # Another thread laid out the same manifest first; its copy is as good.

    def _start_from(
        self,
        base: tuple[Path, Iterable[ManifestEntry]],
        entries: list[ManifestEntry],
        root: str,
        take: bool,
    ) -> list[ManifestEntry]:
        """Move (``take``) or copy ``base``'s tree into the empty folder ``root`` and remove
        what ``entries`` do not keep; returns the entries still to lay out (all of them if
        the copy is not worth it or fails)."""
        tree, base_entries = base
        old = {e.path: e for e in base_entries}
        new = {e.path: e for e in entries}
        todo = [e for e in entries if old.get(e.path) != e]
        if len(todo) > len(entries) // 2 or not tree.is_dir():
            return entries
        try:
            if take:
                os.rename(tree, root)  # onto the empty folder: same filesystem, one call
            else:
                cmd = ["cp", "-al", f"{tree}/.", f"{root}/"]
                subprocess.run(cmd, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            make_writable(Path(root))
            shutil.rmtree(root)
            os.mkdir(root)
            return entries
        old_folders = _folders(old.values(), root)
        for d in old_folders:
            os.chmod(d, 0o755)  # noqa: S103 - writable while the changes go in
        for path, entry in old.items():
            if new.get(path) != entry:
                os.unlink(f"{root}/{path}")
        for d in sorted(old_folders - _folders(entries, root), key=len, reverse=True):
            os.rmdir(d)  # emptied: the new version has no file under it
        return todo

    def _place(self, entry: ManifestEntry, root: str, made: set[str]) -> None:
        """Link (or for an executable, copy) one object to its path under ``root``."""
        target = f"{root}/{entry.path}"
        parent = target.rpartition("/")[0]
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        source = self.path_for(entry.sha256)
        if entry.mode & 0o111:
            shutil.copyfile(source, target)
            os.chmod(target, 0o555)  # noqa: S103 - read-only, executable
            return
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
            os.chmod(target, 0o444)


def _folders(entries: Iterable[ManifestEntry], root: str) -> set[str]:
    """Every folder that holds a file of ``entries`` under ``root``, and ``root``."""
    folders = {root}
    for entry in entries:
        path = entry.path
        while (cut := path.rfind("/")) > 0:
            path = path[:cut]
            if f"{root}/{path}" in folders:
                break
            folders.add(f"{root}/{path}")
    return folders


class PackReceiver:
    """Verifies and stores the members of a pack (an uncompressed tar whose members are named
    by their sha256) while its bytes arrive, so a pack is stored by the time its last byte is
    and its bytes are never written anywhere but into the objects.

    :meth:`feed` takes the pack's bytes in order, in pieces of any size. It reads ustar headers
    and pax extended headers (``path`` and ``size`` records; global ones are skipped). At the
    first member that is not a regular file named by a sha256 the manifest lists at that size,
    or whose bytes do not hash to its name, it stops and records why in :attr:`gave_up`, with
    the same words as :func:`anylearn_sdk.server.api.uploads.ingest_pack`; the rest of the
    pack is then only counted.

    Each member is written to a temporary file beside its object (:meth:`ObjectStore.temp_for`)
    and renamed into place once its digest matched; members already in the store are hashed
    and not written. Nothing is flushed: the caller calls :meth:`ObjectStore.flush`.

    Args:
        sizes: sha256 → size of each object a member may be; None to take any member at the
            size its header gives (a preupload, checked against its name only).
        journal: a file to which the digest of each stored member is appended (one per line),
            and ``end`` once the archive ended, so a restarted server knows what a complete
            pack held without its bytes (:meth:`from_journal`).

    Attributes:
        offset: bytes of the pack consumed so far.
        stored: sha256 digests of the members verified and in the store, in pack order.
        finished: the end-of-archive marker was read.
        gave_up: why the pack is refused (None while it is not).
    """

    def __init__(
        self,
        objects: ObjectStore,
        sizes: Mapping[str, int] | None,
        journal: Path | None = None,
    ):
        self.objects = objects
        self.sizes = sizes
        self.offset = 0
        self.stored: list[str] = []
        self.finished = False
        self.gave_up: str | None = None
        self._journal = (
            os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if journal else -1
        )
        self._header = bytearray()
        self._pax: bytearray | None = None  # the data of a pax header being read
        self._overrides: dict[str, str] = {}  # from the last pax header, for the next member
        self._name = ""
        self._size = 0  # the current member's size
        self._left = 0  # bytes of the current member (or pax data) still to come
        self._pad = 0  # padding bytes still to skip after it
        self._fd = -1
        self._tmp: str | None = None
        self._digest = hashlib.sha256()

    @classmethod
    def from_journal(cls, objects: ObjectStore, journal: Path, length: int) -> PackReceiver | None:
        """The receiver of a complete pack as its journal recorded it, if the journal ends with
        ``end`` and every object it lists is in the store and hashes to its name (read again:
        after a power loss an object may not be); else None."""
        lines = journal.read_text(encoding="ascii").split("\n")
        digests = [line for line in lines if SHA256_HEX.fullmatch(line)]
        if "end" not in lines or any(
            not objects.has(d) or hash_path(objects.path_for(d)) != d for d in digests
        ):
            return None
        receiver = cls(objects, {})
        receiver.stored, receiver.finished, receiver.offset = digests, True, length
        return receiver

    @property
    def complete(self) -> bool:
        """True if every member was stored and the archive ended properly."""
        return self.finished and self.gave_up is None

    def feed(self, data: bytes) -> None:
        """Consume the next ``data`` bytes of the pack."""
        view = memoryview(data)
        self.offset += len(view)
        while view and self.gave_up is None and not self.finished:
            if self._left:
                take = min(self._left, len(view))
                self._member_bytes(view[:take])
                view = view[take:]
            elif self._pad:
                take = min(self._pad, len(view))
                self._pad -= take
                view = view[take:]
            else:
                take = min(TAR_BLOCK - len(self._header), len(view))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == TAR_BLOCK:
                    self._start_member(bytes(self._header))
                    self._header.clear()

    def close(self) -> None:
        """Drop a member left half-written (the stream stopped in its middle); close the
        journal."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None
        if self._journal >= 0:
            os.close(self._journal)
            self._journal = -1

    def _give_up(self, why: str) -> None:
        self.gave_up = why
        self.close()

    def _start_member(self, block: bytes) -> None:
        if block == bytes(TAR_BLOCK):
            self.finished = True  # end of archive: two zero blocks, then padding
            if self._journal >= 0:
                os.write(self._journal, b"end\n")
            self.close()
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            self._give_up(f"pack has a bad tar header at byte {self.offset}: {err}")
            return
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            self._pax = bytearray() if info.type == tarfile.XHDTYPE else None
            self._left, self._pad = info.size, -info.size % TAR_BLOCK
            self._name = ""
            return
        name = self._overrides.get("path", info.name)
        size = int(self._overrides.get("size", info.size))
        self._overrides = {}
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or not SHA256_HEX.fullmatch(name):
            self._give_up(f"pack member {name!r} is not a regular object file")
            return
        if self.sizes is not None and self.sizes.get(name) != size:
            self._give_up(f"pack member {name} is not in the manifest at that size")
            return
        self._name, self._size, self._left, self._pad = name, size, size, -size % TAR_BLOCK
        self._digest = hashlib.sha256()
        if not self.objects.has(name):
            self._tmp = self.objects.temp_for(name)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        if size == 0:
            self._end_member()

    def _member_bytes(self, piece: memoryview) -> None:
        self._left -= len(piece)
        if not self._name:  # a pax header's data
            if self._pax is not None:
                self._pax += piece
                if not self._left:
                    self._overrides = _pax_records(bytes(self._pax))
                    self._pax = None
            return
        self._digest.update(piece)
        while self._fd >= 0 and piece:
            piece = piece[os.write(self._fd, piece) :]
        if not self._left:
            self._end_member()

    def _end_member(self) -> None:
        digest = self._digest.hexdigest()
        if digest != self._name:
            self._give_up(
                f"object {self._name} failed verification: got {self._size} bytes "
                f"with sha256 {digest}"
            )
            return
        if self._tmp is not None:  # written (not already in the store)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.objects.location(self._name))
            self._tmp = None
        self.stored.append(self._name)
        if self._journal >= 0:
            os.write(self._journal, self._name.encode("ascii") + b"\n")
        self._name = ""


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``path`` and ``size`` records of a pax extended header (``"%d %s=%s\\n"`` each)."""
    records: dict[str, str] = {}
    while data:
        length = data.split(b" ", 1)[0]
        try:
            n = int(length)
        except ValueError:
            break
        record = data[len(length) + 1 : n]
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key in (b"path", b"size"):
            records[key.decode()] = value.decode("utf-8", "surrogateescape")
        data = data[n:]
    return records


def make_writable(root: Path) -> None:
    """Give the owner write permission on every folder under ``root`` so it can be removed."""
    for dirpath, _dirnames, _files in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - owner-writable again, for removal
