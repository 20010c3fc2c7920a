"""A user's dataset archive (zip or tar, compressed or not) as a manifest, without extracting it.

Each member is hashed from the archive as it is read; uploads read the members' bytes from the
archive again (:class:`~anylearn_sdk.content.sources.ArchiveMemberSource`). Nothing is written
to disk. Members are checked first, with the rules of tarfile's ``data`` filter (PEP 706):

- a name that is absolute, contains ``..`` or a backslash is refused;
- a symlink or hard link must point to another member inside the archive (it then stands for
  that member's bytes); one pointing out is refused;
- device files, FIFOs and sockets are refused, and so are setuid and setgid bits;
- a name that appears twice is refused (which copy wins would be a guess).

The server checks again what it receives: manifest paths, modes (644 or 755 only) and pack
members (regular files named by their sha256), so a client that skipped these checks still
cannot write outside a dataset's folder.

Reading a compressed tar out of order decompresses from its start; prefer zip or plain tar
for large archives of many files.
"""

from __future__ import annotations

import hashlib
import posixpath
import stat
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from anylearn_sdk.content.manifest import Manifest, remembered
from anylearn_sdk.content.sources import ArchiveMemberSource, Source
from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.progress import HASHING, ProgressCallback, SilentProgress
from anylearn_sdk.protocol import ManifestEntry, check_relative_path, manifest_checksum
from anylearn_sdk.store import LocalStore

BLOCK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _Member:
    path: str  # normalized path in the manifest
    data_name: str  # the member whose bytes it holds (itself, or a link's target)
    size: int
    mode: int


def _unsafe(archive: Path, name: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"dataset_archive {archive.name}: member {name!r} {why}")


def _checked_path(archive: Path, name: str) -> str:
    try:
        return check_relative_path(name, what="member")
    except ValueError as err:
        raise InvalidArgumentError(f"dataset_archive {archive.name}: {err}") from err


def _link_target(archive: Path, name: str, target: str, *, relative_to_member: bool) -> str:
    """The normalized member path a link points to, refusing one that leaves the archive."""
    if target.startswith("/"):
        raise _unsafe(archive, name, f"is a link to an absolute path ({target!r})")
    base = posixpath.dirname(name) if relative_to_member else ""
    joined = posixpath.normpath(posixpath.join(base, target))
    if joined == ".." or joined.startswith("../"):
        raise _unsafe(archive, name, f"is a link pointing out of the archive ({target!r})")
    return joined


def _check_mode(archive: Path, name: str, mode: int) -> None:
    if mode & (stat.S_ISUID | stat.S_ISGID):
        raise _unsafe(archive, name, f"has the setuid or setgid bit (mode {mode:o})")


def _tar_members(archive: Path, tar: tarfile.TarFile) -> list[_Member]:
    found: dict[str, tarfile.TarInfo] = {}
    for info in tar.getmembers():
        if info.isdir():
            continue
        path = _checked_path(archive, info.name)
        if info.isdev() or not (info.isreg() or info.issym() or info.islnk()):
            raise _unsafe(archive, info.name, "is a device file or a FIFO")
        _check_mode(archive, info.name, info.mode)
        if path in found:
            raise _unsafe(archive, info.name, "appears twice")
        found[path] = info
    members = []
    for path, info in found.items():
        data_name, size, mode = info.name, info.size, info.mode
        if info.issym() or info.islnk():
            target = _link_target(
                archive, info.name, info.linkname, relative_to_member=info.issym()
            )
            target_info = found.get(target)
            if target_info is None or not target_info.isreg():
                raise _unsafe(archive, info.name, f"is a link to {target!r}, not a file in it")
            data_name, size, mode = target_info.name, target_info.size, target_info.mode
        members.append(_Member(path, data_name, size, mode))
    return members


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[_Member]:
    found: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        path = _checked_path(archive, info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind and kind not in (stat.S_IFREG, stat.S_IFLNK):
            raise _unsafe(archive, info.filename, "is a device file or a FIFO")
        _check_mode(archive, info.filename, mode)
        if path in found:
            raise _unsafe(archive, info.filename, "appears twice")
        found[path] = info
    members = []
    for path, info in found.items():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            link = zf.read(info).decode("utf-8", "replace")
            target = _link_target(archive, info.filename, link, relative_to_member=True)
            target_info = found.get(target)
            if target_info is None or stat.S_ISLNK(target_info.external_attr >> 16):
                raise _unsafe(archive, info.filename, f"is a link to {link!r}, not a file in it")
            members.append(
                _Member(
                    path,
                    target_info.filename,
                    target_info.file_size,
                    target_info.external_attr >> 16,
                )
            )
        else:
            members.append(_Member(path, info.filename, info.file_size, mode))
    return members


def _hash_stream(stream: IO[bytes], on_bytes: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    while block := stream.read(BLOCK_BYTES):
        digest.update(block)
        on_bytes(len(block))
    return digest.hexdigest()


def _hash_archive(archive: Path, progress: ProgressCallback, label: str) -> Manifest:
    is_zip = zipfile.is_zipfile(archive)
    try:
        handle: tarfile.TarFile | zipfile.ZipFile = (
            zipfile.ZipFile(archive) if is_zip else tarfile.open(archive)
        )
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
        raise InvalidArgumentError(
            f"dataset_archive {str(archive)!r} is not a zip or tar file: {err}"
        ) from err
    phase = f"{HASHING} {label}"
    with handle:
        if isinstance(handle, zipfile.ZipFile):
            members = _zip_members(archive, handle)
        else:
            members = _tar_members(archive, handle)
        progress.phase_start(phase, sum(m.size for m in members))
        try:
            entries: list[ManifestEntry] = []
            sources: dict[str, Source] = {}
            for m in sorted(members, key=lambda m: m.data_name):
                if isinstance(handle, zipfile.ZipFile):
                    stream: IO[bytes] | None = handle.open(m.data_name)
                else:
                    stream = handle.extractfile(m.data_name)
                if stream is None:
                    raise InvalidArgumentError(f"archive member {m.data_name!r} has no data")
                with stream:
                    digest = _hash_stream(stream, lambda n: progress.advance(phase, n))
                mode = 0o755 if m.mode & 0o111 else 0o644
                entries.append(ManifestEntry(m.path, m.size, mode, digest))
                sources.setdefault(digest, ArchiveMemberSource(str(archive), m.data_name, m.size))
        finally:
            progress.phase_end(phase)
    entries.sort(key=lambda e: e.path)
    total = sum(e.size for e in entries)
    return Manifest(
        manifest_checksum(entries), len(entries), total, total, _entries=entries, _sources=sources
    )


def archive_manifest(
    archive: Path,
    store: LocalStore | None,
    progress: ProgressCallback | None = None,
    label: str | None = None,
) -> Manifest:
    """The manifest of a zip or tar file, its members hashed in place.

    An archive whose (size, mtime_ns, inode) are unchanged since its last manifest (and was not
    modified within the racy margin of it) reuses that checksum without being read.

    Raises:
        InvalidArgumentError: not a zip or tar file, or a member is unsafe (named in the message).
    """
    archive = archive.resolve()
    progress = progress or SilentProgress()
    label = label or archive.name
    started_ns = time.time_ns()
    st = archive.stat()
    print_ = f"archive\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    if store is None:
        return _hash_archive(archive, progress, label)
    return remembered(
        store,
        str(archive),
        print_,
        st.st_mtime_ns,
        started_ns,
        lambda: _hash_archive(archive, progress, label),
    )
