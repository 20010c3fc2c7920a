"""Walk a folder, hash what changed, and build its manifest.

Three layers keep a resubmit cheap, cheapest first:

1. **Folder fingerprint.** The walk's stat keys (path, size, mtime_ns, inode, mode of every
   file) are hashed into one fingerprint; if it equals the one stored with the folder's last
   manifest checksum, and no file was modified within ``RACY_MARGIN_NS`` of that walk, the
   checksum is reused without loading a row per file. An unchanged folder costs one walk.
2. **Per-file hash cache** (:mod:`anylearn_sdk.store`): a file whose (size, mtime_ns, inode)
   match its entry is not read, provided its mtime is older than the start of the walk that
   hashed it by at least ``RACY_MARGIN_NS`` (git's "racy" rule, with a margin for
   filesystems whose clocks tick coarsely: FAT's 2 s, or the kernel's jiffy-based timestamps).
3. **Parallel hashing** of the rest (:mod:`anylearn_sdk.content.hashing`).
"""

from __future__ import annotations

import hashlib
import marshal
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from anylearn_sdk.content.hashing import ScannedFile, hash_files
from anylearn_sdk.content.ignore import (
    DEFAULT_EXCLUDE_SUFFIXES,
    DEFAULT_EXCLUDES,
    GITIGNORE_FILE,
    IgnoreRules,
)
from anylearn_sdk.content.sources import FileSource, Source
from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.progress import HASHING, SCANNING, ProgressCallback, SilentProgress
from anylearn_sdk.protocol import (
    ManifestEntry,
    canonical_manifest,
    normalize_mode,
    pack_canonical,
    unpack_entries,
)
from anylearn_sdk.store import FolderManifest, LocalStore

#: A cached hash (or folder fingerprint) is trusted only for files modified at least this
#: long before the walk that recorded it began.
RACY_MARGIN_NS = 2_000_000_000


#: What :func:`scan` finds per file: (relpath, size, mtime_ns, inode, st_mode). A plain tuple:
#: on an unchanged resubmit the walk is the whole cost, and an object per file would add a
#: third to it (and ``marshal`` serializes only plain tuples).
StatKey = tuple[str, int, int, int, int]


@dataclass
class Manifest:
    """The manifest of a folder and where each entry's bytes are.

    Attributes:
        checksum: :func:`anylearn_sdk.protocol.manifest_checksum` of the entries.
        file_count: number of entries.
        total_bytes: sum of the entries' sizes.
        hashed_bytes: bytes read to hash this time (0 on an unchanged resubmit).
        from_fingerprint: True when the checksum came from the folder fingerprint; the entries
            are then built (from the hash cache) only if something asks for them.
        base: the checksum and entries of this folder's previous manifest, when it changed
            since; a new version is then registered as a delta against it.
    """

    checksum: str
    file_count: int
    total_bytes: int
    hashed_bytes: int = 0
    from_fingerprint: bool = False
    base: tuple[str, Callable[[], list[ManifestEntry]]] | None = field(default=None, repr=False)
    _entries: list[ManifestEntry] | None = field(default=None, repr=False)
    _sources: dict[str, Source] | None = field(default=None, repr=False)
    _load: Callable[[], Manifest] | None = field(default=None, repr=False)
    _canonical: bytes | None = field(default=None, repr=False)

    def _loaded(self) -> None:
        if self._entries is None and self._load is not None:
            full = self._load()
            self._entries, self._sources = full._entries, full._sources
            self.checksum = full.checksum  # equal unless the hash cache was edited by hand
            self.hashed_bytes += full.hashed_bytes

    @property
    def entries(self) -> list[ManifestEntry]:
        """Entries sorted by path."""
        self._loaded()
        return self._entries or []

    @property
    def sources(self) -> dict[str, Source]:
        """sha256 → one :class:`Source` holding those bytes."""
        self._loaded()
        return self._sources or {}

    def canonical(self) -> bytes:
        """The canonical manifest the checksum is the sha256 of (UTF-8 JSON)."""
        if self._canonical is None:
            self._canonical = canonical_manifest(self.entries)
        return self._canonical


def scan(root: Path, rules: IgnoreRules | None = None) -> list[StatKey]:
    """Every regular file under ``root`` that the ignore rules keep, in walk order.

    Symlinks to files are followed; symlinks to folders are not. The order is the filesystem's
    (stable while nothing changes); :func:`build_manifest` sorts by path when it needs to.

    Raises:
        InvalidArgumentError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise InvalidArgumentError(f"folder {str(root)!r} does not exist or is not a folder")
    rules = rules or IgnoreRules.load(str(root))
    found: list[StatKey] = []
    append = found.append
    excluded, suffixes = DEFAULT_EXCLUDES, DEFAULT_EXCLUDE_SUFFIXES
    stack = [(str(root), "")]
    while stack:
        absdir, reldir = stack.pop()
        if os.path.isfile(os.path.join(absdir, GITIGNORE_FILE)):
            rules.enter(reldir)
        trivial = rules.trivial
        with os.scandir(absdir) as entries:
            for entry in entries:
                name = entry.name
                if name in excluded:
                    continue
                rel = reldir + name
                if entry.is_dir(follow_symlinks=False):
                    if trivial or not rules.ignored(rel, True):
                        stack.append((entry.path, rel + "/"))
                    continue
                if name.endswith(suffixes) or (not trivial and rules.ignored(rel, False)):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # a dangling symlink
                if st.st_mode & 0o170000 == stat.S_IFREG:
                    append((rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode))
    return found


def fingerprint(files: list[StatKey]) -> str:
    """sha256 over every file's stat key, in walk order: equal means an unchanged walk.

    ``marshal`` serializes the tuples in C, several times faster than formatting them; its
    format may change between Python versions, which only costs one slower resubmit.
    """
    return hashlib.sha256(marshal.dumps(files, 4)).hexdigest()


def _from_files(
    stat_keys: list[StatKey],
    store: LocalStore | None,
    root: Path,
    started_ns: int,
    progress: ProgressCallback,
    label: str,
) -> Manifest:
    """The full manifest: cached digests where the racy rule allows, hashing the rest."""
    prefix = str(root) + os.sep
    files = [ScannedFile(k[0], prefix + k[0], *k[1:]) for k in sorted(stat_keys)]
    cache = store.cached_hashes(root) if store is not None else {}
    digests: list[str] = []  # "" until hashed
    todo: list[int] = []
    for i, f in enumerate(files):
        cached = cache.get(f.abspath)
        if (
            cached is not None
            and (cached.size, cached.mtime_ns, cached.inode) == (f.size, f.mtime_ns, f.inode)
            and f.mtime_ns < cached.cached_at_ns - RACY_MARGIN_NS
        ):
            digests.append(cached.sha256)
        else:
            digests.append("")
            todo.append(i)
    hashed = sum(files[i].size for i in todo)
    if todo:
        phase = f"{HASHING} {label}"
        progress.phase_start(phase, hashed)
        try:
            fresh = hash_files([files[i] for i in todo], lambda n: progress.advance(phase, n))
        finally:
            progress.phase_end(phase)
        for i, d in zip(todo, fresh, strict=True):
            digests[i] = d
        if store is not None:
            store.save_hashes(
                [
                    (files[i].abspath, files[i].size, files[i].mtime_ns, files[i].inode, d)
                    for i, d in zip(todo, fresh, strict=True)
                ],
                cached_at_ns=started_ns,
            )
    entries: list[ManifestEntry] = []
    sources: dict[str, Source] = {}
    for f, digest in zip(files, digests, strict=True):
        entries.append(ManifestEntry(f.relpath, f.size, normalize_mode(f.mode), digest))
        sources.setdefault(digest, FileSource(f.abspath, f.size))
    canonical = canonical_manifest(entries)
    return Manifest(
        hashlib.sha256(canonical).hexdigest(),
        len(entries),
        sum(e.size for e in entries),
        hashed,
        _entries=entries,
        _sources=sources,
        _canonical=canonical,
    )


def build_manifest(
    root: Path,
    store: LocalStore | None,
    progress: ProgressCallback | None = None,
    label: str | None = None,
) -> Manifest:
    """Scan ``root`` and build its manifest, reading only files the caches cannot vouch for.

    Args:
        root: the dataset or model folder.
        store: the local store holding the caches (updated here), or None to hash everything
            and remember nothing (a scratch folder).
        progress: told of the ``scanning`` (files) and ``hashing`` (bytes) phases.
        label: names the folder in progress phases (default: its name).

    Raises:
        InvalidArgumentError: ``root`` is not a folder, an ignore file is unreadable, or a file
            changed while it was hashed.
    """
    root = root.resolve()
    progress = progress or SilentProgress()
    label = label or root.name
    started_ns = time.time_ns()
    phase = f"{SCANNING} {label}"
    progress.phase_start(phase, None, unit="files")
    try:
        files = scan(root)
        progress.advance(phase, len(files))
    finally:
        progress.phase_end(phase)
    if store is None:
        return _from_files(files, None, root, started_ns, progress, label)
    return remembered(
        store,
        str(root),
        fingerprint(files),
        max(map(itemgetter(2), files), default=0),
        started_ns,
        lambda: _from_files(files, store, root, started_ns, progress, label),
    )


def remembered(
    store: LocalStore,
    key: str,
    print_: str,
    max_mtime_ns: int,
    started_ns: int,
    compute: Callable[[], Manifest],
) -> Manifest:
    """The manifest of ``key`` (a folder or archive path) whose walk gave fingerprint ``print_``.

    Reuses the stored checksum when the fingerprint is unchanged and no file was modified
    within ``RACY_MARGIN_NS`` of the walk that stored it (``compute`` then runs only if the
    entries are asked for); otherwise computes the manifest, attaches the previous one as its
    delta base, and stores it.
    """
    known = store.folder_manifest(key)
    if (
        known is not None
        and known.fingerprint == print_
        and known.max_mtime_ns < known.cached_at_ns - RACY_MARGIN_NS
    ):
        return Manifest(
            known.checksum,
            known.file_count,
            known.total_bytes,
            from_fingerprint=True,
            _load=compute,
        )
    manifest = compute()
    if known is not None and known.checksum != manifest.checksum:
        previous = store.folder_entries(key)
        if previous:
            manifest.base = (known.checksum, lambda: unpack_entries(previous))
    state = FolderManifest(
        print_,
        manifest.checksum,
        manifest.file_count,
        manifest.total_bytes,
        max_mtime_ns,
        started_ns,
    )
    store.save_folder_manifest(key, state, pack_canonical(manifest.canonical()))
    return manifest
