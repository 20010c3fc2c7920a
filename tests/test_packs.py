"""Packs: the client's tar bytes, and the server's receiver that stores members as they arrive."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from anylearn_sdk.content.pack import PackMember, PackReader, _header
from anylearn_sdk.content.sources import FileSource
from anylearn_sdk.server.objects import ObjectStore, PackReceiver


@pytest.mark.parametrize("size", [0, 1, 511, 512, 51_200, 8 * 1024 * 1024 - 1])
def test_member_header_is_what_tarfile_writes(size):
    info = tarfile.TarInfo("0f" * 32)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "", ""
    assert _header(PackMember("0f" * 32, size, None)) == info.tobuf(format=tarfile.PAX_FORMAT)


def make_pack(folder: Path, sizes: list[int]) -> tuple[bytes, dict[str, int]]:
    folder.mkdir()
    members = []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        path = folder / f"f{i}"
        path.write_bytes(data)
        members.append(
            PackMember(hashlib.sha256(data).hexdigest(), size, FileSource(str(path), size))
        )
    reader = PackReader(members)
    return reader.read_at(0, reader.length), {m.sha256: m.size for m in members}


def feed_in_pieces(receiver: PackReceiver, data: bytes, seed: int) -> None:
    rnd, offset = random.Random(seed), 0
    while offset < len(data):
        step = rnd.choice([1, 7, 511, 512, 513, 4096, 70_000])
        receiver.feed(data[offset : offset + step])
        offset += step


@pytest.mark.parametrize("seed", range(3))
def test_receiver_stores_every_member_from_pieces_of_any_size(tmp_path, seed):
    pack, sizes = make_pack(tmp_path / "src", [0, 1, 511, 512, 513, 50_000, 200_000])
    store = ObjectStore(tmp_path / "objects")
    receiver = PackReceiver(store, sizes)
    feed_in_pieces(receiver, pack, seed)
    assert receiver.complete and receiver.offset == len(pack)
    assert sorted(receiver.stored) == sorted(sizes)
    for digest in sizes:
        path = store.path_for(digest)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    # Nothing is left under a temporary name, and the stock tar reader agrees.
    assert not [p for p in (tmp_path / "objects").rglob(".*") if p.is_file()]
    with tarfile.open(fileobj=io.BytesIO(pack)) as tar:
        assert sorted(tar.getnames()) == sorted(sizes)


def test_receiver_gives_up_on_a_member_that_does_not_hash_to_its_name(tmp_path):
    pack, sizes = make_pack(tmp_path / "src", [1000, 2000])
    store = ObjectStore(tmp_path / "objects")
    first = sorted(sizes)[0]
    data = bytearray(pack)
    data[512] ^= 0xFF  # the first member's first byte
    receiver = PackReceiver(store, sizes)
    receiver.feed(bytes(data))
    assert not receiver.complete
    assert receiver.gave_up is not None
    assert receiver.gave_up.startswith(f"object {first} failed verification")
    assert not store.has(first)
    assert not [p for p in (tmp_path / "objects").rglob(".*") if p.is_file()]


def test_receiver_gives_up_on_a_member_the_manifest_does_not_list(tmp_path):
    pack, sizes = make_pack(tmp_path / "src", [1000])
    receiver = PackReceiver(ObjectStore(tmp_path / "objects"), {})
    receiver.feed(pack)
    assert receiver.gave_up is not None and "not in the manifest" in receiver.gave_up
    assert receiver.stored == []


def test_a_receiver_cut_mid_member_leaves_no_temporary_file(tmp_path):
    pack, sizes = make_pack(tmp_path / "src", [100_000])
    store = ObjectStore(tmp_path / "objects")
    receiver = PackReceiver(store, sizes)
    receiver.feed(pack[:50_000])
    receiver.close()
    assert receiver.stored == [] and not store.has(next(iter(sizes)))
    assert not [p for p in (tmp_path / "objects").rglob(".*") if p.is_file()]


def test_journal_lets_a_restarted_server_take_a_complete_pack_without_its_bytes(tmp_path):
    pack, sizes = make_pack(tmp_path / "src", [10, 20_000, 30_000])
    store = ObjectStore(tmp_path / "objects")
    journal = tmp_path / "upload.members"
    receiver = PackReceiver(store, sizes, journal)
    feed_in_pieces(receiver, pack, 7)
    assert receiver.complete
    assert journal.read_text().split() == [*receiver.stored, "end"]
    again = PackReceiver.from_journal(store, journal, len(pack))
    assert again is not None and again.complete and again.offset == len(pack)
    assert again.stored == receiver.stored
    # An object that no longer hashes to its name (a power loss) sends the pack again.
    victim = store.path_for(receiver.stored[1])
    victim.chmod(0o644)
    victim.write_bytes(b"torn")
    assert PackReceiver.from_journal(store, journal, len(pack)) is None


def test_journal_of_a_pack_cut_short_is_not_taken(tmp_path):
    pack, sizes = make_pack(tmp_path / "src", [10, 20_000, 30_000])
    store = ObjectStore(tmp_path / "objects")
    journal = tmp_path / "upload.members"
    receiver = PackReceiver(store, sizes, journal)
    receiver.feed(pack[: len(pack) // 2])
    receiver.close()
    assert "end" not in journal.read_text()
    assert PackReceiver.from_journal(store, journal, len(pack)) is None


def test_receiver_reads_pax_headers(tmp_path):
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(digest)
        info.size, info.mtime = len(data), 1.5  # a fractional mtime needs a pax record
        info.pax_headers = {"comment": "x" * 300}
        tar.addfile(info, io.BytesIO(data))
    store = ObjectStore(tmp_path / "objects")
    receiver = PackReceiver(store, {digest: len(data)})
    feed_in_pieces(receiver, out.getvalue(), 3)
    assert receiver.complete and receiver.stored == [digest]
    assert store.path_for(digest).read_bytes() == data
