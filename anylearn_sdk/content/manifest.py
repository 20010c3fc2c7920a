"""Walk a folder, hash what changed, and build its manifest.

Three layers keep a resubmit cheap, cheapest first:

1. **Folder fingerprint.** The walk's stat keys (path, size, mtime_ns, inode, mode of every
   file) are hashed into one fingerprint; if it equals the one stored with the folder's last
   manifest checksum, and no file was modified within ``RACY_MARGIN_NS`` of that walk, the
   checksum is reused without loading a row per file. An unchanged folder costs one walk.
2. **The last walk** (stored with the folder's manifest): every file's stat key with its
   digest. A file whose stat key is unchanged keeps its digest, provided its mtime is older than
   the start of that walk by at least ``RACY_MARGIN_NS`` (git's "racy" rule, with a margin for
   filesystems whose clocks tick coarsely: FAT's 2 s, or the kernel's jiffy-based timestamps).
   Comparing the two walks also gives the delta against the last version directly, so one
   changed file among 20,000 costs a set difference, not a manifest rebuilt and compared.
3. **Per-file hash cache** (:mod:`anylearn_sdk.store`), for the files the last walk cannot
   vouch for: same (size, mtime_ns, inode) and the same racy rule against the walk that hashed it.
4. **Parallel hashing** of the rest (:mod:`anylearn_sdk.content.hashing`).
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import compress
from operator import itemgetter, ne
from pathlib import Path

from anylearn_sdk.content.hashing import OnHashed, ScannedFile, hash_files
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
    canonical_rows,
    manifest_delta,
    normalize_mode,
    pack_canonical,
    splice_manifest,
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
#: A canonical manifest row: (path, size, mode, sha256), the form the checksum is taken of.
Row = tuple[str, int, int, str]
#: How many files the last walk may fail to vouch for before the whole hash cache of the
#: folder is loaded at once instead of asked file by file.
FEW_FILES = 2000


@dataclass(frozen=True)
class Delta:
    """What turns the version ``base_checksum`` into this manifest: entries added or changed,
    and paths removed."""

    base_checksum: str
    changes: list[ManifestEntry]
    removed: list[str]


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
            since; a new version is then registered as a delta against it (see :meth:`delta`).
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
    #: Rows ``[path, size, mode, sha256]`` sorted by path (parsed from the canonical bytes
    #: when first asked for), and the folder they are files of.
    _rows: list | None = field(default=None, repr=False)
    _root: str | None = field(default=None, repr=False)
    _delta: Delta | None = field(default=None, repr=False)
    #: The folder's state being written to the local store (see :meth:`saved`).
    _saving: Future | None = field(default=None, repr=False)
    _wire: list[dict] | None = field(default=None, repr=False)

    def saved(self) -> None:
        """Wait until this folder's state (its fingerprint and walk, what makes the next
        build cheap) is in the local store; :func:`build_manifest` writes it on the store's
        writer thread, so that registering the version need not wait for it.

        Raises:
            sqlite3.Error: the write failed (the next build then hashes more).
        """
        if self._saving is not None:
            self._saving.result()

    def _loaded(self) -> None:
        if (
            self._entries is None
            and self._rows is None
            and self._canonical is None
            and self._load is not None
        ):
            full = self._load()
            self._entries, self._sources = full._entries, full._sources
            self._rows, self._root, self._canonical = full._rows, full._root, full._canonical
            self.checksum = full.checksum  # equal unless the hash cache was edited by hand
            self.hashed_bytes += full.hashed_bytes

    def _row_list(self) -> list | None:
        self._loaded()
        if self._rows is None and self._entries is None and self._canonical is not None:
            self._rows = json.loads(self._canonical)
        return self._rows

    def wire(self) -> list[dict]:
        """The entries as a registration sends them (``ManifestEntry.to_json`` of each, built
        from the rows without an entry object per file; kept, so it can be made in advance)."""
        if self._wire is None:
            rows = self._row_list()
            if rows is None:
                self._wire = [e.to_json() for e in self.entries]
            else:
                self._wire = [
                    {"path": path, "size": size, "mode": mode, "sha256": digest}
                    for path, size, mode, digest in rows
                ]
        return self._wire

    @property
    def entries(self) -> list[ManifestEntry]:
        """Entries sorted by path."""
        rows = self._row_list()
        if self._entries is None and rows is not None:
            self._entries = [ManifestEntry(*row) for row in rows]
        return self._entries or []

    @property
    def sources(self) -> dict[str, Source]:
        """sha256 → one :class:`Source` holding those bytes."""
        rows = self._row_list()
        if self._sources is None and rows is not None and self._root is not None:
            prefix, sources = self._root + os.sep, {}
            for path, size, _, digest in rows:
                if digest not in sources:
                    sources[digest] = FileSource(prefix + path, size)
            self._sources = sources
        return self._sources or {}

    def _changed(self, digests: list[str]) -> list[ManifestEntry] | None:
        """The delta's entries holding ``digests``, if it holds all of them (a version
        registered as a delta against a READY one lacks only objects of its changes)."""
        if self._delta is None or self._root is None or self._sources is not None:
            return None
        wanted = set(digests)
        changed = [e for e in self._delta.changes if e.sha256 in wanted]
        return changed if wanted <= {e.sha256 for e in changed} else None

    def sources_for(self, digests: list[str]) -> dict[str, Source]:
        """:attr:`sources` of these digests only (no object per file when a few are missing)."""
        changed = self._changed(digests)
        if changed is not None and self._root is not None:
            return {e.sha256: FileSource(self._root + os.sep + e.path, e.size) for e in changed}
        rows = self._row_list()
        if self._sources is not None or rows is None or self._root is None:
            return {d: self.sources[d] for d in digests}
        wanted, prefix, found = set(digests), self._root + os.sep, {}
        for path, size, _, digest in rows:
            if digest in wanted and digest not in found:
                found[digest] = FileSource(prefix + path, size)
        return found

    def sizes_for(self, digests: list[str]) -> dict[str, int]:
        """sha256 → size in bytes, of these objects."""
        changed = self._changed(digests)
        if changed is not None:
            return {e.sha256: e.size for e in changed}
        rows = self._row_list()
        if rows is not None:
            wanted = set(digests)
            return {row[3]: row[1] for row in rows if row[3] in wanted}
        return {e.sha256: e.size for e in self.entries if e.sha256 in set(digests)}

    def delta(self) -> Delta | None:
        """The delta against this folder's previous version, if it has one and changed."""
        if self._delta is None and self.base is not None:
            base_checksum, base_entries = self.base
            changes, removed = manifest_delta(base_entries(), self.entries)
            self._delta = Delta(base_checksum, changes, removed)
        return self._delta

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


@dataclass(frozen=True)
class LastWalk:
    """The walk stored with a folder's manifest: its stat keys in walk order, the canonical
    manifest they gave, when that walk began (``time.time_ns()``) and its newest mtime."""

    keys: list[StatKey]
    canonical: bytes
    checksum: str
    started_ns: int
    max_mtime_ns: int = 0

    def dump(self) -> bytes:
        return marshal.dumps((self.keys, self.canonical), 4)

    @classmethod
    def load(
        cls, blob: bytes, checksum: str, started_ns: int, max_mtime_ns: int
    ) -> LastWalk | None:
        """The walk in ``blob``; None if it cannot be read (another Python's ``marshal``
        wrote it: the next build is only slower)."""
        try:
            # Our own bytes, in the user's own store (a folder of mode 0700), like the hash
            # cache: nothing here runs, and a shape that does not fit is ignored.
            keys, canonical = marshal.loads(blob)  # noqa: S302
        except (ValueError, EOFError, TypeError):
            return None
        if not (isinstance(keys, list) and isinstance(canonical, bytes)):
            return None
        return cls(keys, canonical, checksum, started_ns, max_mtime_ns)

    def rows(self) -> list[list]:
        return json.loads(self.canonical)


def _from_walk(
    stat_keys: list[StatKey],
    store: LocalStore | None,
    root: Path,
    started_ns: int,
    progress: ProgressCallback,
    label: str,
    last: LastWalk | None = None,
    on_hashed: OnHashed | None = None,
) -> tuple[Manifest, LastWalk]:
    """The full manifest and this walk: rows the last walk vouches for (unchanged stat key,
    not racy), then digests from the hash cache, then hashing the rest; with the delta
    against the last walk's version when there is one.

    When no file was added since the last walk, the files whose stat key changed are found
    by comparing the two walks in C, and their rows are spliced into the last canonical
    manifest (:func:`~anylearn_sdk.protocol.splice_manifest`): no row is built for the files
    that did not change.
    """
    max_mtime_ns = max(map(itemgetter(2), stat_keys), default=0)
    if last is not None:
        found = _spliced(stat_keys, max_mtime_ns, last, store, root, started_ns, progress, label)
        if found is not None:
            return found
    keys = sorted(stat_keys)  # by path: paths are unique
    rows: list = [None] * len(keys)
    todo = list(range(len(keys)))
    if last is not None:
        trust_before = last.started_ns - RACY_MARGIN_NS
        known, by_path = set(last.keys), {row[0]: row for row in last.rows()}
        rows = [by_path[k[0]] if k in known and k[2] < trust_before else None for k in keys]
        todo = [i for i, row in enumerate(rows) if row is None]
    digests, hashed = _digests_of(
        [keys[i] for i in todo], store, root, started_ns, progress, label, on_hashed
    )
    for i in todo:
        path, size, _, _, st_mode = keys[i]
        rows[i] = [path, size, normalize_mode(st_mode), digests[path]]
    canonical = canonical_rows(rows)
    manifest = Manifest(
        hashlib.sha256(canonical).hexdigest(),
        len(rows),
        sum(map(itemgetter(1), keys)),
        hashed,
        _canonical=canonical,
        _rows=rows,
        _root=str(root),
    )
    if last is not None and last.checksum != manifest.checksum:
        before = {row[0]: row for row in last.rows()}
        changes = [ManifestEntry(*rows[i]) for i in todo if before.get(rows[i][0]) != rows[i]]
        removed = sorted(before.keys() - {k[0] for k in keys})
        manifest._delta = Delta(last.checksum, changes, removed)
    return manifest, LastWalk(stat_keys, canonical, manifest.checksum, started_ns, max_mtime_ns)


def _spliced(
    keys: list[StatKey],
    max_mtime_ns: int,
    last: LastWalk,
    store: LocalStore | None,
    root: Path,
    started_ns: int,
    progress: ProgressCallback,
    label: str,
) -> tuple[Manifest, LastWalk] | None:
    """:func:`_from_walk` for a folder with no file added since ``last``: the changed and
    removed files' rows spliced into its canonical manifest. None if a file was added."""
    if len(keys) == len(last.keys):
        # Same count: compare the walks index by index (in C); if every differing index
        # keeps its path, no file was added or removed.
        differ = list(compress(range(len(keys)), map(ne, keys, last.keys)))
        if any(keys[i][0] != last.keys[i][0] for i in differ):
            return None
        removed: list[str] = []
        changed = [keys[i] for i in differ]
    else:
        paths = {k[0] for k in last.keys}
        changed = list(set(keys).difference(last.keys))
        if any(k[0] not in paths for k in changed):
            return None  # an added file: its place is found by a rebuild
        removed = sorted(paths.difference(k[0] for k in keys))
    trust_before = last.started_ns - RACY_MARGIN_NS
    if last.max_mtime_ns >= trust_before:
        # Files modified near the last walk are not vouched for by it (the racy rule); a file
        # whose stat key is unchanged has the mtime it had then, so none is if none was.
        changed = list({*changed, *(k for k in keys if k[2] >= trust_before)})
    digests, hashed = _digests_of(changed, store, root, started_ns, progress, label)
    rows = {k[0]: [k[0], k[1], normalize_mode(k[4]), digests[k[0]]] for k in changed}
    spliced = splice_manifest(last.canonical, {**rows, **dict.fromkeys(removed)})
    if spliced is None:  # pragma: no cover - every path came from the last walk
        return None
    canonical, before = spliced
    checksum = hashlib.sha256(canonical).hexdigest()
    manifest = Manifest(
        checksum,
        len(keys),
        sum(map(itemgetter(1), keys)),
        hashed,
        _canonical=canonical,
        _root=str(root),
    )
    if checksum != last.checksum:
        changes = sorted(ManifestEntry(*row) for path, row in rows.items() if before[path] != row)
        manifest._delta = Delta(last.checksum, changes, removed)
    return manifest, LastWalk(keys, canonical, checksum, started_ns, max_mtime_ns)


def _digests_of(
    keys: list[StatKey],
    store: LocalStore | None,
    root: Path,
    started_ns: int,
    progress: ProgressCallback,
    label: str,
    on_hashed: OnHashed | None = None,
) -> tuple[dict[str, str], int]:
    """relpath → sha256 of these files, from the hash cache where its entry holds (same size,
    mtime and inode, not racy), else hashed (and cached, and told to ``on_hashed`` as
    :func:`~anylearn_sdk.content.hashing.hash_files` goes); and the bytes hashed."""
    prefix = str(root) + os.sep
    found: dict[str, str] = {}
    if keys and store is not None:
        if len(keys) <= FEW_FILES:
            cache = store.cached_hashes_of([prefix + k[0] for k in keys])
        else:
            cache = store.cached_hashes(root)
        for path, size, mtime_ns, inode, _ in keys:
            cached = cache.get(prefix + path)
            if (
                cached is not None
                and (cached.size, cached.mtime_ns, cached.inode) == (size, mtime_ns, inode)
                and mtime_ns < cached.cached_at_ns - RACY_MARGIN_NS
            ):
                found[path] = cached.sha256
    files = [ScannedFile(k[0], prefix + k[0], *k[1:]) for k in keys if k[0] not in found]
    hashed = sum(f.size for f in files)
    if files:
        phase = f"{HASHING} {label}"
        progress.phase_start(phase, hashed)
        try:
            fresh = hash_files(files, lambda n: progress.advance(phase, n), on_hashed=on_hashed)
        finally:
            progress.phase_end(phase)
        found.update((f.relpath, d) for f, d in zip(files, fresh, strict=True))
        if store is not None:
            store.save_hashes(
                [
                    (f.abspath, f.size, f.mtime_ns, f.inode, d)
                    for f, d in zip(files, fresh, strict=True)
                ],
                cached_at_ns=started_ns,
            )
    return found, hashed


def build_manifest(
    root: Path,
    store: LocalStore | None,
    progress: ProgressCallback | None = None,
    label: str | None = None,
    on_hashed: OnHashed | None = None,
) -> Manifest:
    """Scan ``root`` and build its manifest, reading only files the caches cannot vouch for.

    Args:
        root: the dataset or model folder.
        store: the local store holding the caches and the last walk (updated here), or None
            to hash everything and remember nothing (a scratch folder).
        progress: told of the ``scanning`` (files) and ``hashing`` (bytes) phases.
        label: names the folder in progress phases (default: its name).
        on_hashed: told of the files hashed while the rest are (in batches, see
            :func:`~anylearn_sdk.content.hashing.hash_files`): what preuploads them.

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
        return _from_walk(files, None, root, started_ns, progress, label)[0]
    key, print_ = str(root), fingerprint(files)
    known = store.folder_manifest(key)
    unchanged = _unchanged(
        known,
        print_,
        lambda: _from_walk(
            files, store, root, started_ns, progress, label, _last_walk(store, key, known)
        )[0],
    )
    if unchanged is not None:
        return unchanged
    manifest, walk = _from_walk(
        files, store, root, started_ns, progress, label, _last_walk(store, key, known), on_hashed
    )
    if manifest._delta is None and known is not None and known.checksum != manifest.checksum:
        previous = store.folder_entries(key)  # kept by a store from before walks were kept
        if previous:
            manifest.base = (known.checksum, lambda: unpack_entries(previous))
    state = FolderManifest(
        print_,
        manifest.checksum,
        manifest.file_count,
        manifest.total_bytes,
        max(map(itemgetter(2), files), default=0),
        started_ns,
    )
    manifest._saving = store.in_background(
        lambda: store.save_folder_manifest(key, state, walk=walk.dump())
    )
    return manifest


def _unchanged(
    known: FolderManifest | None, print_: str, load: Callable[[], Manifest]
) -> Manifest | None:
    """The stored manifest if the walk's fingerprint is unchanged and no file was modified
    within ``RACY_MARGIN_NS`` of the walk that stored it (``load`` builds its entries only if
    they are asked for); else None."""
    if (
        known is not None
        and known.fingerprint == print_
        and known.max_mtime_ns < known.cached_at_ns - RACY_MARGIN_NS
    ):
        return Manifest(
            known.checksum, known.file_count, known.total_bytes, from_fingerprint=True, _load=load
        )
    return None


def _last_walk(store: LocalStore, key: str, known: FolderManifest | None) -> LastWalk | None:
    if known is None:
        return None
    blob = store.folder_walk(key)
    if not blob:
        return None
    return LastWalk.load(blob, known.checksum, known.cached_at_ns, known.max_mtime_ns)


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
    unchanged = _unchanged(known, print_, compute)
    if unchanged is not None:
        return unchanged
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
