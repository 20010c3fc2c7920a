"""sha256 of files at the machine's speed.

- **Large files** (``LARGE_HASH_BYTES`` or more) are hashed one per task. By default each is
  mapped into memory ``HASH_WINDOW_BYTES`` at a time and hashed in place, as git (``index_fd``)
  and BLAKE3's ``b3sum`` do: reading copies every byte once more, which costs 10-15% of the
  hashing rate. A mapped file that another process truncates while it is hashed would end this
  process with SIGBUS, so the size is checked before each window is mapped (the window left is
  the few milliseconds one window takes to hash); ``ANYLEARN_HASH_MMAP=0`` turns mapping off
  (like ``b3sum --no-mmap``), and files that cannot be mapped are read instead.
- **Small files** are hashed in batches, a batch per task (one task per small file costs more
  in scheduling than it saves), each file with a single ``readv`` into a page-aligned buffer:
  the kernel copies into memory aligned to 16 bytes (what ``malloc`` and ``bytes`` give) up to
  three times slower than into 64-byte-aligned memory, which for 50 KiB files is a third of the
  cost of reading them.
- Tasks run on ``os.cpu_count()`` threads; hashlib releases the GIL while it hashes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from anylearn_sdk.config import hash_mmap_enabled
from anylearn_sdk.errors import ContentChangedError
from anylearn_sdk.interrupts import stoppable_pool

#: Files at least this large are hashed one per task; smaller ones in batches.
LARGE_HASH_BYTES = 4 * 1024 * 1024
#: A large file is mapped (or read) this much at a time.
HASH_WINDOW_BYTES = 16 * 1024 * 1024
#: A batch of small files holds at most this many bytes or ``SMALL_BATCH_FILES`` files.
SMALL_BATCH_BYTES = 16 * 1024 * 1024
SMALL_BATCH_FILES = 256
#: Set to ``0`` to read large files rather than map them.


class ScannedFile(NamedTuple):
    """A file to hash: where it is and its stat key."""

    relpath: str
    abspath: str
    size: int
    mtime_ns: int
    inode: int
    mode: int


def _changed(path: str) -> ContentChangedError:
    return ContentChangedError(f"file {path!r} changed while it was hashed; submit again")


@contextmanager
def _aligned_buffer(size: int) -> Iterator[memoryview]:
    """A page-aligned scratch buffer of ``size`` bytes (an anonymous mapping)."""
    buffer = mmap.mmap(-1, size)
    view = memoryview(buffer)
    try:
        yield view
    finally:
        view.release()
        buffer.close()


def _mmap_enabled() -> bool:
    return hash_mmap_enabled()


class HashingStopped(Exception):
    """Hashing was stopped on request (Ctrl-C); raised in the worker threads."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise HashingStopped


def _hash_mapped(
    fd: int,
    path: str,
    size: int,
    on_bytes: Callable[[int], None] | None,
    stop: threading.Event | None = None,
) -> str | None:
    """The digest, or None if the file cannot be mapped at all (some FUSE mounts)."""
    digest = hashlib.sha256()
    for offset in range(0, size, HASH_WINDOW_BYTES):
        _check(stop)
        if os.fstat(fd).st_size != size:
            raise _changed(path)
        length = min(HASH_WINDOW_BYTES, size - offset)
        try:
            window = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=offset)
        except (OSError, ValueError):
            if offset == 0:
                return None
            raise
        with window:
            digest.update(window)
        if on_bytes is not None:
            on_bytes(length)
    return digest.hexdigest()


def _hash_read(
    fd: int, on_bytes: Callable[[int], None] | None, stop: threading.Event | None = None
) -> str:
    digest = hashlib.sha256()
    with _aligned_buffer(HASH_WINDOW_BYTES) as view:
        while n := os.readv(fd, [view]):
            _check(stop)
            digest.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest()


def hash_file(
    path: str,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> str:
    """sha256 (hex) of the file at ``path``, mapped window by window where allowed, else read.

    ``on_bytes(n)`` is called as each window of ``n`` bytes is hashed.

    Raises:
        ContentChangedError: the file changed size while it was hashed.
        HashingStopped: ``stop`` was set (checked before each window).
        OSError: it cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size and _mmap_enabled():
            digest = _hash_mapped(fd, path, size, on_bytes, stop)
            if digest is not None:
                return digest
        return _hash_read(fd, on_bytes, stop)
    finally:
        os.close(fd)


def _hash_large(
    f: ScannedFile, on_bytes: Callable[[int], None], stop: threading.Event | None = None
) -> str:
    digest = hash_file(f.abspath, on_bytes, stop)
    st = os.stat(f.abspath)
    if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
        raise _changed(f.abspath)
    return digest


def _hash_small_batch(
    batch: list[ScannedFile], on_bytes: Callable[[int], None], stop: threading.Event | None = None
) -> list[str]:
    """Hash small files with one ``readv`` each (the size is known from the walk)."""
    _check(stop)
    digests = []
    sha256 = hashlib.sha256
    with _aligned_buffer(max(f.size for f in batch) + 1) as view:
        for f in batch:
            fd = os.open(f.abspath, os.O_RDONLY)
            try:
                n = os.readv(fd, [view[: f.size + 1]])
            finally:
                os.close(fd)
            if n != f.size:
                raise _changed(f.abspath)
            digests.append(sha256(view[:n]).hexdigest())
    on_bytes(sum(f.size for f in batch))
    return digests


def _batches(files: list[ScannedFile], small: list[int]) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i in small:
        current.append(i)
        current_bytes += files[i].size
        if current_bytes >= SMALL_BATCH_BYTES or len(current) >= SMALL_BATCH_FILES:
            batches.append(current)
            current, current_bytes = [], 0
    if current:
        batches.append(current)
    return batches


#: ``on_hashed(files, digests)``: files whose hashing just ended, with their digests.
OnHashed = Callable[[list[ScannedFile], list[str]], None]


def hash_files(
    files: list[ScannedFile],
    on_bytes: Callable[[int], None],
    workers: int | None = None,
    on_hashed: OnHashed | None = None,
) -> list[str]:
    """sha256 (hex) of each file, in order, on ``workers`` threads (default ``os.cpu_count()``).

    ``on_bytes(n)`` is called from the worker threads as ``n`` more bytes are hashed.
    ``on_hashed`` is called on the calling thread as hashing goes on, once per batch of small
    files (in the order of ``files``) and then once per large file, so that what is hashed can
    be used (sent) while the rest is: every file is reported once, in a stable order.

    Raises:
        ContentChangedError: a file changed size while it was read.
        OSError: a file cannot be opened or read.
    """
    large = [i for i, f in enumerate(files) if f.size >= LARGE_HASH_BYTES]
    batches = _batches(files, [i for i, f in enumerate(files) if f.size < LARGE_HASH_BYTES])
    digests: list[str] = [""] * len(files)
    workers = workers or os.cpu_count() or 1

    def done(indices: list[int], found: list[str]) -> None:
        for i, d in zip(indices, found, strict=True):
            digests[i] = d
        if on_hashed is not None:
            on_hashed([files[i] for i in indices], found)

    if len(large) + len(batches) <= 1 or workers == 1:
        for b in batches:
            done(b, _hash_small_batch([files[i] for i in b], on_bytes))
        for i in large:
            done([i], [_hash_large(files[i], on_bytes)])
        return digests
    # On Ctrl-C or a failed file, the other threads stop at their next window.
    with stoppable_pool(workers, "anylearn-hash") as (pool, stop):
        large_futures = {i: pool.submit(_hash_large, files[i], on_bytes, stop) for i in large}
        batch_futures = [
            (b, pool.submit(_hash_small_batch, [files[i] for i in b], on_bytes, stop))
            for b in batches
        ]
        for b, fut in batch_futures:
            done(b, fut.result())
        for i, fut in large_futures.items():
            done([i], [fut.result()])
    return digests
