"""Content-addressed object store: ``objects/<aa>/<rest of sha256>``, written once, verified.

An object exists in the store only after its bytes were hashed and the digest matched the name
it was asked to have; the final ``os.replace`` makes that atomic, so a crash of the server never
leaves a half object under a valid name. Against power loss, a large object is fsynced before
its rename; the many small objects of a pack are flushed by one ``os.sync()`` after the pack
(an fsync per 50 KiB file would cost more than receiving it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from anylearn_sdk.protocol import (
    SHA256_HEX,
    ManifestEntry,
    check_relative_path,
    normalize_mode,
)

COPY_BLOCK_BYTES = 1024 * 1024


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
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for prefix in range(256):  # every fan-out folder up front: no mkdir per object
            (root / f"{prefix:02x}").mkdir(exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests (deduplicated, sorted) that the store does not hold."""
        return sorted({d for d in digests if not self.has(d)})

    def ingest(self, stream: BinaryIO, sha256: str, size: int) -> bool:
        """Store ``size`` bytes read from ``stream`` as object ``sha256``.

        The bytes go to a temporary file created read-only (0o444) and named after the object
        and the process and thread, which is renamed into place once its digest matched.

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
        tmp_name = self.tmp / f"{sha256}.{os.getpid()}.{threading.get_ident()}"
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
                tmp_name.unlink(missing_ok=True)

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

    def materialize(self, manifest: Iterable[ManifestEntry], dest: Path) -> None:
        """Lay out a manifest's files under ``dest`` read-only, hard-linking the stored objects.

        Built in a sibling temporary folder and renamed into place, so ``dest`` either does not
        exist or is complete (two threads may lay out the same one; the first rename wins).
        Executable files are copied (mode 0o555) since a hard link shares the object's
        read-only 0o444 mode. Folders end read-only (0o555).
        """
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        dirs: set[Path] = {staging}
        for entry in manifest:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.update(p for p in target.parents if staging in p.parents or p == staging)
            source = self.path_for(entry.sha256)
            if entry.mode & 0o111:
                shutil.copyfile(source, target)
                os.chmod(target, 0o555)  # noqa: S103 - read-only, executable
                continue
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
                os.chmod(target, 0o444)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            os.chmod(d, 0o555)  # noqa: S103 - read-only folder
        try:
            os.rename(staging, dest)
        except OSError:
            if not dest.is_dir():
                raise
            # Another thread laid out the same manifest first; its copy is as good.
            make_writable(staging)
            shutil.rmtree(staging)


def make_writable(root: Path) -> None:
    """Give the owner write permission on every folder under ``root`` so it can be removed."""
    for dirpath, _dirnames, _files in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - owner-writable again, for removal
