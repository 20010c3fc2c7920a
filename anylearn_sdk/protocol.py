"""Wire formats shared by the SDK and the reference backend.

Everything here is pure (no I/O) so both halves import it and can never disagree:

* the canonical manifest of a dataset or model and its checksum;
* the validation of relative paths (manifest entries, the task's ``output``);
* how hyperparameters become command-line arguments (Anylearn's prefix/delimiter convention,
  which also covers Hydra's ``key=value`` and ``+key=value`` overrides).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import shlex
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import lt
from pathlib import PurePosixPath

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: Author e-mail and message prefix of the commits the SDK makes of a working tree with
#: uncommitted changes (or of a folder without git); the experiment record calls them snapshots.
SNAPSHOT_EMAIL = "anylearn@localhost"
SNAPSHOT_MESSAGE_PREFIX = "anylearn snapshot of "
#: Modes a manifest records, as git does: only the executable bit survives.
FILE_MODES = (0o644, 0o755)
#: Names of the mount environment variables, also usable as ``${VAR}`` placeholders.
MOUNT_ENV_VARS = {
    "dataset": "ANYLEARN_DATASET_DIR",
    "model": "ANYLEARN_MODEL_DIR",
    "pretrain": "ANYLEARN_PRETRAIN_DIR",
    "output": "ANYLEARN_OUTPUT_DIR",
}


@dataclass(frozen=True, order=True)
class ManifestEntry:
    """One file of a dataset or model.

    Attributes:
        path: relative POSIX path inside the dataset root.
        size: bytes.
        mode: 0o644 or 0o755 (executable bit only, as git records it).
        sha256: lowercase hex digest of the content.
    """

    path: str
    size: int
    mode: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mode": self.mode, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping) -> ManifestEntry:
        return cls(str(data["path"]), int(data["size"]), int(data["mode"]), str(data["sha256"]))


def normalize_mode(st_mode: int) -> int:
    """Map a stat mode to the manifest's mode: 0o755 if any execute bit is set, else 0o644."""
    return 0o755 if st_mode & 0o111 else 0o644


def manifest_checksum(entries: Iterable[ManifestEntry]) -> str:
    """The checksum of a dataset or model: sha256 of its canonical manifest.

    The canonical form is the compact JSON array ``[[path, size, mode, sha256], ...]`` sorted by
    path, UTF-8 encoded. Two folders with the same files (paths, contents and executable bits)
    have the same checksum whatever their mtimes, owners or location.

    Returns:
        64-character lowercase hex string.
    """
    return hashlib.sha256(canonical_manifest(entries)).hexdigest()


def canonical_manifest(entries: Iterable[ManifestEntry]) -> bytes:
    """The canonical manifest :func:`manifest_checksum` hashes (see there), as bytes."""
    return canonical_rows(sorted((e.path, e.size, e.mode, e.sha256) for e in entries))


def canonical_rows(rows: list) -> bytes:
    """The canonical manifest of ``rows``, ``[path, size, mode, sha256]`` lists or tuples
    already sorted by path (one C-speed ``json.dumps``, no object per entry)."""
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_relative_path(path: str, *, what: str = "path") -> str:
    """Validate a relative POSIX path that must stay inside its root.

    Args:
        path: the path to check.
        what: how to name the value in the error message.

    Returns:
        The path, normalized (no ``.`` components, no trailing slash).

    Raises:
        ValueError: if the path is empty, absolute, contains ``..``, a backslash, a NUL or an
            empty component.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} {path!r} is empty; give a relative path such as 'output'")
    if "\x00" in path or "\\" in path:
        raise ValueError(f"{what} {path!r} contains a NUL or a backslash; use '/' separators")
    if path[0] != "/" and path[-1] != "/" and "//" not in path:
        parts = path.split("/")
        if "." not in parts and ".." not in parts:
            return path  # already normal: the common case, without PurePosixPath
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ValueError(f"{what} {path!r} is absolute; it must be relative to its root")
    parts = [p for p in pure.parts if p != "."]
    if ".." in parts:
        raise ValueError(f"{what} {path!r} contains '..'; it must stay inside its root")
    if not parts:
        raise ValueError(f"{what} {path!r} names the root itself; give a sub-folder")
    return "/".join(parts)


def validate_manifest(entries: Iterable[Mapping]) -> list[ManifestEntry]:
    """Parse and check a manifest received over the wire.

    Raises:
        ValueError: naming the first bad entry: a bad path, a negative size, an unknown mode, a
            malformed digest, a duplicate path, or a path that is both a file and a folder.
    """
    parsed: list[ManifestEntry] = []
    for raw in entries:
        try:
            entry = ManifestEntry.from_json(raw)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"manifest entry {raw!r} needs path, size, mode and sha256") from err
        normalized = check_relative_path(entry.path, what="manifest path")
        if normalized != entry.path:
            raise ValueError(f"manifest path {entry.path!r} is not normalized ({normalized!r})")
        if entry.size < 0:
            raise ValueError(f"manifest entry {entry.path!r} has negative size {entry.size}")
        if entry.mode not in FILE_MODES:
            raise ValueError(
                f"manifest entry {entry.path!r} has mode {entry.mode:o}; use 644 or 755"
            )
        if not SHA256_HEX.fullmatch(entry.sha256):
            raise ValueError(f"manifest entry {entry.path!r} has a malformed sha256")
        parsed.append(entry)
    paths = {e.path for e in parsed}
    if len(paths) != len(parsed):
        raise ValueError("manifest lists the same path twice")
    folders: set[str] = set()
    for p in paths:
        while (cut := p.rfind("/")) > 0:
            p = p[:cut]
            if p in folders:
                break  # its parents were looked at already
            if p in paths:
                raise ValueError(f"manifest path {p!r} is both a file and a folder")
            folders.add(p)
    if all(map(lt, parsed, parsed[1:])):  # sent in canonical order, as our client does
        return parsed
    return sorted(parsed)


def substitute_placeholders(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` for the mount variables in ``env``; other text is left as is."""

    def repl(match: re.Match) -> str:
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\{(ANYLEARN_[A-Z_]+)\}", repl, text)


def format_hyperparams(
    hyperparams: Mapping[str, object], prefix: str = "--", delimiter: str = " "
) -> list[str]:
    """Turn hyperparameters into shell-quoted command-line words.

    Follows the Anylearn SDK convention: ``{"lr": 0.1}`` with prefix ``--`` and delimiter ``" "``
    gives ``--lr 0.1``; delimiter ``"="`` gives ``--lr=0.1``; a value of ``""`` (or None) is a
    bare flag ``--verbose``. Hydra overrides use prefix ``""`` (``lr=0.1``), ``+`` or ``++``
    with delimiter ``"="``.

    Returns:
        Shell words, each already quoted with :func:`shlex.quote`, in the mapping's order.
    """
    words: list[str] = []
    for key, value in hyperparams.items():
        flag = f"{prefix}{key}"
        if value is None or value == "":
            words.append(shlex.quote(flag))
        elif delimiter.strip() == "":
            words.extend([shlex.quote(flag), shlex.quote(str(value))])
        else:
            words.append(shlex.quote(f"{flag}{delimiter}{value}"))
    return words


def manifest_delta(
    old: Iterable[ManifestEntry], new: Iterable[ManifestEntry]
) -> tuple[list[ManifestEntry], list[str]]:
    """What turns manifest ``old`` into ``new``: entries added or changed, and paths removed."""
    before = {e.path: e for e in old}
    after = list(new)
    changes = [e for e in after if before.get(e.path) != e]
    kept = {e.path for e in after}
    return changes, sorted(p for p in before if p not in kept)


def apply_delta(base: list, changes: Iterable[ManifestEntry], removed: Iterable[str]) -> list:
    """The manifest ``base`` (rows ``[path, size, mode, sha256]`` sorted by path) with
    ``removed`` paths dropped and ``changes`` put in; rows sorted by path.

    ``base`` is trusted to be valid and ``changes`` to have passed :func:`validate_manifest`;
    only what they make together is checked (a changed path that becomes a file and a folder),
    so a delta of a few files costs a few checks, not one per entry.

    Raises:
        ValueError: a removed path is not in ``base``, or a changed path is both a file and a
            folder.
    """
    rows = {row[0]: row for row in base}
    for path in removed:
        if rows.pop(path, None) is None:
            raise ValueError(f"removed path {path!r} is not in the base manifest")
    changes = list(changes)
    for e in changes:
        rows[e.path] = [e.path, e.size, e.mode, e.sha256]
    paths = sorted(rows)
    for e in changes:  # the base had no conflicts: only the changed paths can make one
        for parent in PurePosixPath(e.path).parents:
            if str(parent) in rows:
                raise ValueError(f"manifest path {str(parent)!r} is both a file and a folder")
        below = bisect.bisect_left(paths, e.path + "/")
        if below < len(paths) and paths[below].startswith(e.path + "/"):
            raise ValueError(f"manifest path {e.path!r} is both a file and a folder")
    return [rows[p] for p in paths]


def locate_row(canonical: bytes, path: str) -> tuple[int, int] | None:
    """Where the row of ``path`` is in a canonical manifest: ``canonical[start:end]`` is its
    JSON; None if it has no such row.

    A row begins ``["<path>",`` right after ``[`` or ``,``; a match is parsed back and its
    path compared, so a path that contains another row's text is never taken for it.
    """
    head = b'["' + json.dumps(path, ensure_ascii=False)[1:-1].encode("utf-8") + b'",'
    at = canonical.find(head)
    while at > 0:
        if canonical[at - 1] in b"[,":
            end = canonical.find(b'"]', at + len(head)) + 2
            try:
                row = json.loads(canonical[at:end])
            except ValueError:
                row = None
            if isinstance(row, list) and row and row[0] == path:
                return at, end
        at = canonical.find(head, at + 1)
    return None


def splice_manifest(
    canonical: bytes, edits: Mapping[str, list | tuple | None]
) -> tuple[bytes, dict[str, list]] | None:
    """A canonical manifest with rows replaced (path → new row, same path) or removed
    (path → None), its other bytes copied: a few edits of a 20,000-row manifest cost a few
    searches, not a parse and a re-encoding.

    Returns:
        The new canonical bytes and the edited paths' old rows; None if a path has no row
        (an addition, whose place only a rebuild finds).
    """
    spans = []
    old: dict[str, list] = {}
    for path, row in edits.items():
        span = locate_row(canonical, path)
        if span is None:
            return None
        old[path] = json.loads(canonical[span[0] : span[1]])
        spans.append((span, row))
    spans.sort(key=lambda item: item[0])
    out = bytearray()
    pos = 0
    for (start, end), row in spans:
        out += canonical[pos:start]
        if row is not None:
            out += canonical_rows([row])[1:-1]
            pos = end
        elif canonical[end : end + 1] == b",":
            pos = end + 1  # the row and the comma after it
        else:  # the last row: the comma before it goes too
            if out.endswith(b","):
                del out[-1]
            pos = end
    out += canonical[pos:]
    return bytes(out), old


def pack_canonical(canonical: bytes) -> bytes:
    """zlib of a :func:`canonical_manifest`, to keep a manifest locally in a few bytes per file."""
    return zlib.compress(canonical, 1)


def unpack_entries(blob: bytes) -> list[ManifestEntry]:
    return [ManifestEntry(*row) for row in json.loads(zlib.decompress(blob))]
