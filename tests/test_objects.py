"""The object store lays out a version from an earlier one's tree, changing only what differs."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from anylearn_sdk.protocol import ManifestEntry
from anylearn_sdk.server.objects import ObjectStore


def put(store: ObjectStore, files: dict[str, tuple[bytes, int]]) -> list[ManifestEntry]:
    entries = []
    for path, (data, mode) in files.items():
        digest = hashlib.sha256(data).hexdigest()
        if not store.has(digest):
            store.ingest(io.BytesIO(data), digest, len(data))
        entries.append(ManifestEntry(path, len(data), mode, digest))
    return sorted(entries)


def tree(root: Path) -> dict[str, tuple[str, bytes | None]]:
    """Every file and folder under ``root``: its mode and, for a file, its bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            data = None if path.is_dir() else path.read_bytes()
            found[rel] = (oct(path.stat().st_mode & 0o777), data)
    return found


def test_a_version_laid_out_from_an_earlier_tree_equals_one_laid_out_afresh(tmp_path):
    store = ObjectStore(tmp_path / "objects")
    v1 = put(
        store,
        {
            "a/keep.txt": (b"same", 0o644),
            "a/change.txt": (b"old", 0o644),
            "gone/only.txt": (b"removed with its folder", 0o644),
            "run.sh": (b"#!/bin/sh\n", 0o755),
            "top.txt": (b"top", 0o644),
        },
    )
    v2 = put(
        store,
        {
            "a/keep.txt": (b"same", 0o644),
            "a/change.txt": (b"new", 0o644),
            "new/deep/added.txt": (b"added", 0o644),
            "run.sh": (b"#!/bin/sh\n", 0o755),
            "top.txt": (b"top", 0o755),  # only the mode changed
        },
    )
    store.materialize(v1, tmp_path / "v1")
    store.materialize(v2, tmp_path / "v2", base=(tmp_path / "v1", v1))
    store.materialize(v2, tmp_path / "fresh")
    assert tree(tmp_path / "v2") == tree(tmp_path / "fresh")
    assert oct((tmp_path / "v2").stat().st_mode & 0o777) == oct(0o555)
    # The earlier tree is untouched, and unchanged files share their inode with it.
    assert tree(tmp_path / "v1")["a/change.txt"] == ("0o444", b"old")
    assert (tmp_path / "v1" / "gone" / "only.txt").exists()
    assert (tmp_path / "v2/a/keep.txt").stat().st_ino == (tmp_path / "v1/a/keep.txt").stat().st_ino
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_unused_base_tree_is_moved_and_changed_in_place(tmp_path):
    store = ObjectStore(tmp_path / "objects")
    v1 = put(store, {f"d/f{i}": (b"v1 %d" % i, 0o644) for i in range(6)})
    v2 = put(store, {**{f"d/f{i}": (b"v1 %d" % i, 0o644) for i in range(5)}, "e/g": (b"g", 0o644)})
    store.materialize(v1, tmp_path / "v1")
    inode = (tmp_path / "v1/d/f0").stat().st_ino
    store.materialize(v2, tmp_path / "v2", base=(tmp_path / "v1", v1), take_base=True)
    store.materialize(v2, tmp_path / "fresh")
    assert tree(tmp_path / "v2") == tree(tmp_path / "fresh")
    assert not (tmp_path / "v1").exists()  # taken; laid out again when next asked for
    assert (tmp_path / "v2/d/f0").stat().st_ino == inode
    store.materialize(v1, tmp_path / "v1", base=(tmp_path / "v2", v2))
    assert tree(tmp_path / "v1") == {
        "d": ("0o555", None),
        **{f"d/f{i}": ("0o444", b"v1 %d" % i) for i in range(6)},
    }


def test_a_base_that_shares_little_is_not_copied(tmp_path):
    store = ObjectStore(tmp_path / "objects")
    v1 = put(store, {f"f{i}": (b"v1 %d" % i, 0o644) for i in range(4)})
    v2 = put(store, {f"f{i}": (b"v2 %d" % i, 0o644) for i in range(4)})
    store.materialize(v1, tmp_path / "v1")
    store.materialize(v2, tmp_path / "v2", base=(tmp_path / "v1", v1))
    assert tree(tmp_path / "v2") == {f"f{i}": ("0o444", b"v2 %d" % i) for i in range(4)}
