"""A pack: the missing objects of a manifest as one deterministic, uncompressed tar.

Members are named by their sha256 and hold the file's bytes. The pack is never written to
disk: :class:`PackReader` computes its exact length up front and produces the bytes at any
offset from the source files, so a tus upload resumes at the server's offset by seeking.
"""

from __future__ import annotations

import bisect
import hashlib
import tarfile
from dataclasses import dataclass

from anylearn_sdk.content.sources import Source

BLOCK = tarfile.BLOCKSIZE  # 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


@dataclass(frozen=True)
class PackMember:
    sha256: str
    size: int
    source: Source


#: The ustar header of a member named by a sha256, mode 0o444, mtime 0, owner 0:0 (no names),
#: as ``tarfile`` writes it; :func:`_header` puts in the name, size and checksum.
_TEMPLATE = b"".join(
    (
        bytes(100),  # name
        b"0000444\x00",  # mode
        b"0000000\x00" * 2,  # uid, gid
        bytes(12),  # size
        b"00000000000\x00",  # mtime
        bytes(8),  # checksum
        b"0",  # type: regular file
        bytes(100),  # linkname
        b"ustar\x0000",  # magic, version
        bytes(32 + 32 + 8 + 8 + 155 + 12),  # uname, gname, devmajor, devminor, prefix, pad
    )
)
_SIZE, _CHKSUM = slice(124, 136), slice(148, 156)


def _header(member: PackMember) -> bytes:
    """The member's 512-byte ustar header, byte for byte what ``tarfile`` writes for it
    (``tests/test_content.py`` checks), built without ``TarInfo``: 20,000 of those took a
    second before the first pack could leave."""
    if member.size >= 8**11:  # pragma: no cover - packs hold files under LARGE_FILE_BYTES
        raise ValueError(f"pack member of {member.size} bytes is too large for ustar")
    block = bytearray(_TEMPLATE)
    name = member.sha256.encode("ascii")
    block[: len(name)] = name
    block[_SIZE] = b"%011o\x00" % member.size
    block[_CHKSUM] = b"        "
    block[_CHKSUM] = b"%06o\x00 " % sum(block)
    return bytes(block)


class PackReader:
    """Random access to the bytes of a pack of ``members``.

    Attributes:
        length: the pack's size in bytes.
        key: sha256 over the member digests, naming this pack's content (for resume).
    """

    def __init__(self, members: list[PackMember]):
        self.members = sorted(members, key=lambda m: m.sha256)
        # Every header is one block, so the length is known without building any: the
        # segments are laid out on the first read, on the thread that sends the pack, and a
        # plan of 20,000 files is ready before the first pack could leave.
        self.length = sum(BLOCK + m.size + (-m.size % BLOCK) for m in self.members) + len(
            END_OF_ARCHIVE
        )
        self._segments: list[tuple[int, bytes | PackMember, int]] = []  # (start, what, length)
        self._starts: list[int] = []
        self.key = hashlib.sha256("".join(m.sha256 for m in self.members).encode()).hexdigest()

    def _lay_out(self) -> None:
        segments: list[tuple[int, bytes | PackMember, int]] = []
        offset = 0
        for m in self.members:
            segments.append((offset, _header(m), BLOCK))
            offset += BLOCK
            segments.append((offset, m, m.size))
            offset += m.size
            pad = -m.size % BLOCK
            if pad:
                segments.append((offset, b"\0" * pad, pad))
                offset += pad
        segments.append((offset, END_OF_ARCHIVE, len(END_OF_ARCHIVE)))
        self._starts = [seg[0] for seg in segments]
        self._segments = segments

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes starting at ``offset`` (fewer only at the end of the pack).

        Raises:
            InvalidArgumentError: a source changed since it was hashed.
        """
        data = bytearray(max(0, min(size, self.length - offset)))
        return bytes(data[: self.read_into(offset, memoryview(data))])

    def read_into(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` with the bytes starting at ``offset``; returns how many (fewer than
        ``len(view)`` only at the end of the pack). Each source is read straight into ``view``.

        Raises:
            InvalidArgumentError: a source changed since it was hashed.
        """
        if not self._segments:
            self._lay_out()
        filled, size = 0, len(view)
        index = bisect.bisect_right(self._starts, offset) - 1
        while filled < size and 0 <= index < len(self._segments):
            start, what, length = self._segments[index]
            skip = offset - start
            take = min(length - skip, size - filled)
            if isinstance(what, bytes):
                view[filled : filled + take] = what[skip : skip + take]
            else:
                what.source.read_into(skip, view[filled : filled + take])
            offset += take
            filled += take
            index += 1
        return filled
