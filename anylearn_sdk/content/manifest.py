"""Walk a folder, hash what changed, and build its manifest.

Per-file sha256 comes from the local store's hash cache when (size, mtime_ns, inode) match and
the file is older than the cache entry (see :mod:`anylearn_sdk.store`), so an unchanged folder
is scanned with ``os.scandir`` + ``stat`` and no file content is read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.protocol import ManifestEntry, manifest_checksum, normalize_mode
from anylearn_sdk.store import LocalStore

HASH_BLOCK_BYTES = 1024 * 1024
#: Names never uploaded as data, wherever they appear.
DEFAULT_EXCLUDES = frozenset({".git", "__pycache__", ".venv", ".DS_Store"})
DEFAULT_EXCLUDE_SUFFIXES = (".pyc",)

ProgressCallback = Callable[[int], None]


@dataclass
class ScannedFile:
    """A file found by the walk: where it is and its stat key."""

    relpath: str
    abspath: str
    size: int
    mtime_ns: int
    inode: int
    mode: int


@dataclass
class Manifest:
    """The manifest of a folder and where each entry's bytes are on disk.

    Attributes:
        entries: sorted :class:`ManifestEntry` list.
        checksum: :func:`anylearn_sdk.protocol.manifest_checksum` of the entries.
        sources: sha256 → absolute path of one local file with that content.
        hashed_bytes: bytes read to hash this time (0 on an unchanged resubmit).
    """

    entries: list[ManifestEntry]
    checksum: str
    sources: dict[str, str] = field(repr=False)
    hashed_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)


def scan(root: Path) -> list[ScannedFile]:
    """Every regular file under ``root`` (symlinks to files followed, to folders not), sorted.

    Raises:
        InvalidArgumentError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise InvalidArgumentError(f"folder {str(root)!r} does not exist or is not a folder")
    found: list[ScannedFile] = []
    stack = [(str(root), "")]
    while stack:
        absdir, reldir = stack.pop()
        with os.scandir(absdir) as it:
            for entry in it:
                if entry.name in DEFAULT_EXCLUDES or entry.name.endswith(DEFAULT_EXCLUDE_SUFFIXES):
                    continue
                rel = f"{reldir}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, rel + "/"))
                    continue
                try:
                    st = entry.stat(follow_symlinks=True)
                except FileNotFoundError:
                    continue  # a dangling symlink
                if stat.S_ISREG(st.st_mode):
                    found.append(
                        ScannedFile(
                            rel, entry.path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode
                        )
                    )
    found.sort(key=lambda f: f.relpath)
    return found


def hash_file(path: str, on_bytes: ProgressCallback | None = None) -> str:
    """sha256 of a file, read in 1 MiB blocks (hashlib releases the GIL on large updates)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def build_manifest(
    root: Path,
    store: LocalStore | None,
    on_hash_bytes: ProgressCallback | None = None,
) -> Manifest:
    """Scan ``root`` and build its manifest, hashing only files the cache cannot vouch for.

    Args:
        root: the dataset or model folder.
        store: the local store holding the hash cache (new hashes are saved to it), or None to
            hash everything and cache nothing (a scratch folder).
        on_hash_bytes: called with a byte count as content is hashed (for progress bars).
    """
    root = root.resolve()
    files = scan(root)
    cache = store.cached_hashes(root) if store is not None else {}
    entries: list[ManifestEntry] = []
    sources: dict[str, str] = {}
    fresh: list[tuple[str, int, int, int, str]] = []
    hashed = 0
    for f in files:
        cached = cache.get(f.abspath)
        if (
            cached is not None
            and (cached.size, cached.mtime_ns, cached.inode) == (f.size, f.mtime_ns, f.inode)
            and f.mtime_ns < cached.cached_at_ns
        ):
            digest = cached.sha256
        else:
            digest = hash_file(f.abspath, on_hash_bytes)
            hashed += f.size
            fresh.append((f.abspath, f.size, f.mtime_ns, f.inode, digest))
        entries.append(ManifestEntry(f.relpath, f.size, normalize_mode(f.mode), digest))
        sources.setdefault(digest, f.abspath)
    if store is not None:
        store.save_hashes(fresh)
    return Manifest(entries, manifest_checksum(entries), sources, hashed)
