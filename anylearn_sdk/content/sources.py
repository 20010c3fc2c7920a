"""Where the bytes of one manifest entry come from: a file, or a member of a user's archive.

Uploads read any range of a source at any time (a resumed part starts mid-file), so a source
answers ``read(skip, take)`` and checks that what it reads is still what was hashed. The
sender fills its one buffer with ``read_into(skip, view)`` instead: no bytes object per file
and no copy of it into the block sent.
"""

from __future__ import annotations

import os
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from typing import Protocol

from anylearn_sdk.errors import ContentChangedError, InvalidArgumentError


class Source(Protocol):
    size: int

    def read(self, skip: int, take: int) -> bytes:
        """``take`` bytes starting ``skip`` bytes in.

        Raises:
            ContentChangedError: the source changed since it was hashed.
        """

    def read_into(self, skip: int, view: memoryview) -> None:
        """Fill ``view`` with the ``len(view)`` bytes starting ``skip`` bytes in.

        Raises:
            ContentChangedError: the source changed since it was hashed.
        """


@dataclass(frozen=True)
class FileSource:
    """A local file of ``size`` bytes."""

    path: str
    size: int

    def read(self, skip: int, take: int) -> bytes:
        data = bytearray(take)
        self.read_into(skip, memoryview(data))
        return bytes(data)

    def read_into(self, skip: int, view: memoryview) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != self.size:
                raise ContentChangedError(
                    f"file {self.path!r} changed while uploading; submit again"
                )
            filled = 0
            while filled < len(view):
                n = os.preadv(fd, [view[filled:]], skip + filled)
                if not n:
                    raise ContentChangedError(
                        f"file {self.path!r} changed while uploading; submit again"
                    )
                filled += n
        finally:
            os.close(fd)


_open_archives = threading.local()


def _archive(path: str) -> tarfile.TarFile | zipfile.ZipFile:
    """This thread's open handle on ``path`` (an index of 20,000 members is read once)."""
    cache = getattr(_open_archives, "cache", None)
    if cache is None:
        cache = _open_archives.cache = {}
    handle = cache.get(path)
    if handle is None:
        handle = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else tarfile.open(path)
        cache[path] = handle
    return handle


def close_archives() -> None:
    """Close this thread's archive handles."""
    for handle in getattr(_open_archives, "cache", {}).values():
        handle.close()
    _open_archives.cache = {}


@dataclass(frozen=True)
class ArchiveMemberSource:
    """A member (``name``, ``size`` bytes) of a zip or tar archive, read without extracting."""

    archive: str
    name: str
    size: int

    def read(self, skip: int, take: int) -> bytes:
        handle = _archive(self.archive)
        if isinstance(handle, zipfile.ZipFile):
            stream = handle.open(self.name)
        else:
            stream = handle.extractfile(self.name)
            if stream is None:
                raise InvalidArgumentError(f"archive member {self.name!r} has no data")
        with stream:
            if skip:
                stream.seek(skip)  # zip and compressed tar decompress forward; plain tar seeks
            data = stream.read(take)
        if len(data) != take:
            raise ContentChangedError(f"archive {self.archive!r} changed while uploading")
        return data

    def read_into(self, skip: int, view: memoryview) -> None:
        view[:] = self.read(skip, len(view))
