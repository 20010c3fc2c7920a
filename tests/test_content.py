"""Local content rules: ignore files, the racy-stat guard, archives hashed in place."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import time
import zipfile

import pytest
from conftest import age, git

from anylearn_sdk import gitsync
from anylearn_sdk.content import hashing
from anylearn_sdk.content.archive import archive_manifest
from anylearn_sdk.content.manifest import build_manifest, scan
from anylearn_sdk.content.sources import close_archives
from anylearn_sdk.errors import ContentChangedError, InvalidArgumentError
from anylearn_sdk.store import LocalStore


def write(root, rel, data=b"x"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def kept(root):
    return sorted(k[0] for k in scan(root))


def test_default_excludes(tmp_path):
    for rel in ("a.py", ".git/config", "sub/__pycache__/m.pyc", ".venv/bin/python",
                "sub/.DS_Store", "sub/x.pyc", "sub/keep.txt"):  # fmt: skip
        write(tmp_path, rel)
    assert kept(tmp_path) == ["a.py", "sub/keep.txt"]


def test_gitignore_semantics(tmp_path):
    write(tmp_path, ".gitignore", b"*.log\n!keep.log\nbuild/\n/top.txt\ndeep/**/tmp\n")
    for rel in ("a.log", "keep.log", "x/b.log", "build/out.bin", "x/build/o.bin", "top.txt",
                "x/top.txt", "deep/a/b/tmp", "deep/tmpx", "build.txt"):  # fmt: skip
        write(tmp_path, rel)
    assert kept(tmp_path) == [
        ".gitignore", "build.txt", "deep/tmpx", "keep.log", "x/top.txt"
    ]  # fmt: skip


def test_nested_gitignore_overrides_the_parent(tmp_path):
    write(tmp_path, ".gitignore", b"*.csv\n")
    write(tmp_path, "data/.gitignore", b"!train.csv\n")
    for rel in ("a.csv", "data/train.csv", "data/test.csv"):
        write(tmp_path, rel)
    assert kept(tmp_path) == [".gitignore", "data/.gitignore", "data/train.csv"]


def test_file_in_ignored_folder_cannot_be_reincluded_by_gitignore(tmp_path):
    write(tmp_path, ".gitignore", b"cache/\n!cache/keep.bin\n")
    write(tmp_path, "cache/keep.bin")
    assert kept(tmp_path) == [".gitignore"]


def test_anylearnignore_wins_over_gitignore(tmp_path):
    # The data a repository keeps out of git is exactly what a dataset upload needs.
    write(tmp_path, ".gitignore", b"*.bin\nnotes.md\n")
    write(tmp_path, ".anylearnignore", b"!*.bin\nscratch/\n")
    for rel in ("weights.bin", "notes.md", "scratch/s.bin", "readme.txt"):
        write(tmp_path, rel)
    assert kept(tmp_path) == [".anylearnignore", ".gitignore", "readme.txt", "weights.bin"]


def test_racy_file_is_hashed_again(tmp_path):
    """A same-size rewrite keeping the mtime is caught while the mtime is within the margin."""
    store = LocalStore(tmp_path / "home")
    data = tmp_path / "data"
    path = write(data, "a.bin", b"A" * 4096)
    first = build_manifest(data, store)
    st = path.stat()
    path.write_bytes(b"B" * 4096)  # same size; same inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: a racy write
    assert path.stat().st_ino == st.st_ino
    second = build_manifest(data, store)
    assert second.checksum != first.checksum
    assert second.hashed_bytes == 4096


def test_old_unchanged_file_is_not_read_again(tmp_path):
    store = LocalStore(tmp_path / "home")
    data = tmp_path / "data"
    write(data, "a.bin", b"A" * 4096)
    write(data, "sub/b.bin", b"B" * 100)
    age(data)
    first = build_manifest(data, store)
    assert first.hashed_bytes == 4196
    again = build_manifest(data, store)
    assert again.from_fingerprint and again.hashed_bytes == 0
    assert again.checksum == first.checksum
    assert [e.to_json() for e in again.entries] == [e.to_json() for e in first.entries]


def test_changed_folder_is_rebuilt_from_its_last_walk_with_the_delta(tmp_path):
    """Only files whose stat key changed are read; the delta against the last version is
    what changed (a touched file is not a change), and the checksum is the one a build from
    scratch gives: spliced into the last manifest when no file was added, rebuilt when one
    was."""
    store = LocalStore(tmp_path / "home")
    data = tmp_path / "data"
    for i in range(50):
        write(data, f"d{i % 5}/f{i:02}.bin", bytes([i]) * (100 + i))
    age(data)
    first = build_manifest(data, store)
    assert first.hashed_bytes == sum(100 + i for i in range(50)) and first.delta() is None

    def check(manifest, base, changes, removed):
        assert manifest.checksum == build_manifest(data, None).checksum != base.checksum
        delta = manifest.delta()
        assert delta is not None and delta.base_checksum == base.checksum
        assert [(e.path, e.size) for e in delta.changes] == changes
        assert delta.removed == removed
        assert manifest.total_bytes == sum(e.size for e in manifest.entries)
        digests = [e.sha256 for e in manifest.entries]
        assert manifest.sizes_for(digests) == {e.sha256: e.size for e in manifest.entries}

    write(data, "d0/f00.bin", b"changed")
    (data / "d1" / "f01.bin").touch()  # a new mtime, the same bytes
    (data / "d2" / "f02.bin").unlink()
    second = build_manifest(data, store)  # spliced: no file added
    assert second.hashed_bytes == len(b"changed") + 101
    check(second, first, [("d0/f00.bin", 7)], ["d2/f02.bin"])
    source = second.sources_for([hashlib.sha256(b"changed").hexdigest()])
    assert list(source.values())[0].read(0, 7) == b"changed"
    write(data, "d9/new.bin", b"added")
    third = build_manifest(data, store)  # rebuilt around the added file
    # The files changed just before the second walk are racy for it: they are read again.
    assert third.hashed_bytes == len(b"added") + 101 + len(b"changed")
    check(third, second, [("d9/new.bin", 5)], [])
    source = third.sources[hashlib.sha256(b"added").hexdigest()]
    assert source.read(0, 5) == b"added"


@pytest.mark.parametrize("mapped", ["1", "0"], ids=["mapped", "read"])
def test_parallel_hashing_matches_hashlib(tmp_path, monkeypatch, mapped):
    # Large files are hashed in windows (mapped, or read with ANYLEARN_HASH_MMAP=0); a small
    # window makes the 9 MiB file take many, the last one partial.
    monkeypatch.setenv("ANYLEARN_HASH_MMAP", mapped)
    monkeypatch.setattr(hashing, "HASH_WINDOW_BYTES", 1024 * 1024)
    data = tmp_path / "data"
    blobs = {f"s{i}.bin": os.urandom(i * 997) for i in range(300)}
    blobs["large.bin"] = os.urandom(9 * 1024 * 1024 + 123)
    blobs["empty.bin"] = b""
    for rel, blob in blobs.items():
        write(data, rel, blob)
    manifest = build_manifest(data, None)
    assert {e.path: e.sha256 for e in manifest.entries} == {
        rel: hashlib.sha256(blob).hexdigest() for rel, blob in blobs.items()
    }


def test_file_that_shrinks_while_hashed_is_an_error_not_a_crash(tmp_path, monkeypatch):
    # Mapping checks the size before each window, so a file truncated between windows is a
    # clear error rather than SIGBUS on touching a page past its new end.
    monkeypatch.setattr(hashing, "HASH_WINDOW_BYTES", 1024 * 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(6 * 1024 * 1024))

    def truncate_after_first_window(n: int) -> None:
        os.truncate(path, 1024 * 1024)

    with pytest.raises(ContentChangedError, match="changed while it was hashed") as caught:
        hashing.hash_file(str(path), truncate_after_first_window)
    # The folder is fine, it was being written to: not a bad argument to the call.
    assert not isinstance(caught.value, InvalidArgumentError)


# archives --------------------------------------------------------------------------------
def tar_with(tmp_path, *infos: tuple[tarfile.TarInfo, bytes | None]):
    path = tmp_path / "data.tar"
    with tarfile.open(path, "w") as tar:
        for info, data in infos:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name, kind=tarfile.REGTYPE, mode=0o644, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    return info


UNSAFE_TAR = {
    "dotdot": [(member("../evil.txt"), b"x")],
    "absolute": [(member("/etc/evil.txt"), b"x")],
    "symlink_out": [(member("link", tarfile.SYMTYPE, linkname="../../etc/passwd"), None)],
    "symlink_absolute": [(member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), None)],
    "hardlink_out": [(member("hard", tarfile.LNKTYPE, linkname="../outside"), None)],
    "char_device": [(member("dev", tarfile.CHRTYPE), None)],
    "block_device": [(member("blk", tarfile.BLKTYPE), None)],
    "fifo": [(member("pipe", tarfile.FIFOTYPE), None)],
    "setuid": [(member("run.sh", mode=0o4755), b"#!/bin/sh\n")],
    "setgid": [(member("run.sh", mode=0o2755), b"#!/bin/sh\n")],
    "duplicate": [(member("a.txt"), b"1"), (member("a.txt"), b"2")],
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TAR))
def test_unsafe_tar_member_is_refused(tmp_path, case):
    path = tar_with(tmp_path, (member("ok.txt"), b"fine"), *UNSAFE_TAR[case])
    with pytest.raises(InvalidArgumentError, match=r"dataset_archive data\.tar: member"):
        archive_manifest(path, None)


def zip_with(tmp_path, name, data, mode):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


UNSAFE_ZIP = {
    "dotdot": ("../evil.txt", b"x", stat.S_IFREG | 0o644),
    "absolute": ("/evil.txt", b"x", stat.S_IFREG | 0o644),
    "symlink_out": ("link", b"../../etc/passwd", stat.S_IFLNK | 0o777),
    "symlink_absolute": ("link", b"/etc/passwd", stat.S_IFLNK | 0o777),
    "char_device": ("dev", b"", stat.S_IFCHR | 0o644),
    "fifo": ("pipe", b"", stat.S_IFIFO | 0o644),
    "setuid": ("run.sh", b"#!/bin/sh\n", stat.S_IFREG | 0o4755),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ZIP))
def test_unsafe_zip_member_is_refused(tmp_path, case):
    path = zip_with(tmp_path, *UNSAFE_ZIP[case])
    with pytest.raises(InvalidArgumentError, match=r"dataset_archive data\.zip"):
        archive_manifest(path, None)


def folder_and_archives(tmp_path):
    data = tmp_path / "data"
    write(data, "a.txt", b"alpha\n")
    write(data, "sub/b.bin", os.urandom(70_000))
    (data / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (data / "run.sh").chmod(0o755)
    tgz = tmp_path / "data.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for rel in ("a.txt", "sub/b.bin", "run.sh"):
            tar.add(data / rel, arcname=rel)
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel in ("a.txt", "sub/b.bin", "run.sh"):
            zf.write(data / rel, rel)
    return data, tgz, zpath


def test_archive_manifest_equals_the_folder_manifest(tmp_path):
    data, tgz, zpath = folder_and_archives(tmp_path)
    expected = build_manifest(data, None).checksum
    assert archive_manifest(tgz, None).checksum == expected
    assert archive_manifest(zpath, None).checksum == expected


def test_link_inside_the_archive_stands_for_its_target(tmp_path):
    path = tar_with(
        tmp_path,
        (member("data/a.txt"), b"alpha"),
        (member("data/alias.txt", tarfile.SYMTYPE, linkname="a.txt"), None),
        (member("data/hard.txt", tarfile.LNKTYPE, linkname="data/a.txt"), None),
    )
    manifest = archive_manifest(path, None)
    digests = {e.path: e.sha256 for e in manifest.entries}
    assert digests["data/alias.txt"] == digests["data/a.txt"] == digests["data/hard.txt"]
    source = manifest.sources[digests["data/a.txt"]]
    try:
        assert source.read(1, 3) == b"lph"
    finally:
        close_archives()


def test_unchanged_archive_is_not_read_again(tmp_path):
    store = LocalStore(tmp_path / "home")
    _, tgz, _ = folder_and_archives(tmp_path)
    when = time.time() - 3600
    os.utime(tgz, (when, when))
    first = archive_manifest(tgz, store)
    again = archive_manifest(tgz, store)
    assert again.from_fingerprint and again.checksum == first.checksum


# algorithm snapshots ----------------------------------------------------------------------
def snapshot_files(snap) -> list[str]:
    out = git(
        "--git-dir",
        str(snap.git_dir),
        "ls-tree",
        "-r",
        "--name-only",
        snap.commit,
        cwd=snap.git_dir,
    )
    return sorted(out.split())


def test_anylearnignore_leaves_files_out_of_an_algorithm(algorithm_repo, tmp_path):
    (algorithm_repo / ".anylearnignore").write_text("checkpoints/\n*.ckpt\n")
    git("add", ".anylearnignore", cwd=algorithm_repo)
    git("commit", "-qm", "ignore checkpoints", cwd=algorithm_repo)
    head = git("rev-parse", "HEAD", cwd=algorithm_repo).strip()
    write(algorithm_repo, "checkpoints/epoch1.bin", b"weights")
    write(algorithm_repo, "last.ckpt", b"weights")
    write(algorithm_repo, "__pycache__/train.cpython-311.pyc", b"bytecode")
    # Ignored files do not make the tree dirty: the exact HEAD commit is pinned.
    snap = gitsync.snapshot(algorithm_repo, scratch_root=tmp_path / "scratch")
    assert snap.commit == head and not snap.snapshot
    write(algorithm_repo, "util.py", b"x = 1\n")
    snap = gitsync.snapshot(algorithm_repo, force=True, scratch_root=tmp_path / "scratch")
    assert snapshot_files(snap) == [".anylearnignore", ".gitignore", "train.py", "util.py"]


def test_anylearnignore_in_a_plain_folder(tmp_path):
    folder = tmp_path / "plain"
    write(folder, "train.py", b"print(1)\n")
    write(folder, ".anylearnignore", b"data/\n!keep.pyc\n")
    write(folder, "data/big.bin", b"x")
    write(folder, "keep.pyc", b"x")
    write(folder, "drop.pyc", b"x")
    snap = gitsync.snapshot(folder, scratch_root=tmp_path / "scratch")
    assert snapshot_files(snap) == [".anylearnignore", "keep.pyc", "train.py"]


@pytest.mark.parametrize("workers", [1, 2])
def test_hashing_reports_each_file_once_as_it_goes(tmp_path, monkeypatch, workers):
    """``on_hashed`` gets every file once with its digest: the batches of small files in the
    order given (what preuploads cut into packs, so a rerun cuts the same ones), then the
    large files."""
    monkeypatch.setattr(hashing, "SMALL_BATCH_FILES", 3)
    monkeypatch.setattr(hashing, "LARGE_HASH_BYTES", 5000)
    files = []
    for i, size in enumerate([100, 6000, 200, 300, 7000, 400, 500, 600]):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        st = path.stat()
        files.append(hashing.ScannedFile(path.name, str(path), size, st.st_mtime_ns, 0, 0))
    reported: list[tuple[list[str], list[str]]] = []
    digests = hashing.hash_files(
        files,
        lambda n: None,
        workers=workers,
        on_hashed=lambda done, found: reported.append(([f.relpath for f in done], found)),
    )
    assert [names for names, _ in reported] == [
        ["f0", "f2", "f3"],
        ["f5", "f6", "f7"],
        ["f1"],
        ["f4"],
    ]
    told = {name: d for names, found in reported for name, d in zip(names, found, strict=True)}
    assert told == {f.relpath: d for f, d in zip(files, digests, strict=True)}
    assert told["f4"] == hashlib.sha256((tmp_path / "f4").read_bytes()).hexdigest()
