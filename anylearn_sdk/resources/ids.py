"""Ids by unique prefix, as docker and git take them: ``task-e98c`` or just ``e98c``."""

from __future__ import annotations

import re
from collections.abc import Callable

from anylearn_sdk.errors import InvalidArgumentError, NotFoundError

#: The readable kind part of every id the backend makes (``task-3f2a9c1b0d4e5f60``).
ID_PREFIXES = {"task": "task", "dataset": "dset", "model": "model"}
_FULL_ID = re.compile(r"[a-z]+-[0-9a-f]{16}")
#: Candidates named in an "ambiguous" error.
SHOWN_CANDIDATES = 5


def resolve_id(kind: str, ref: str, matching: Callable[[str], list[str]]) -> str:
    """The one id of ``kind`` that ``ref`` names.

    Args:
        kind: ``task``, ``dataset`` or ``model``.
        ref: a whole id, or a prefix of one; the ``task-`` part may be left out.
        matching: ids of the caller's that start with a prefix (one server request).

    Raises:
        NotFoundError: no id starts with ``ref`` (``resource_id`` is ``ref``).
        InvalidArgumentError: ``ref`` is empty, or several ids start with it (they are named).
    """
    ref = ref.strip()
    if not ref:
        raise InvalidArgumentError(f"give a {kind} id, or the start of one")
    head = ID_PREFIXES[kind] + "-"
    prefix = ref if ref.startswith(head) else head + ref
    if _FULL_ID.fullmatch(prefix):
        return prefix
    found = matching(prefix)
    if prefix in found or len(found) == 1:
        return prefix if prefix in found else found[0]
    if not found:
        raise NotFoundError(
            f"{kind} {ref!r} not found: no id starts with {prefix!r}", resource_id=ref
        )
    shown = ", ".join(sorted(found)[:SHOWN_CANDIDATES])
    more = "..." if len(found) > SHOWN_CANDIDATES else ""
    raise InvalidArgumentError(
        f"{prefix!r} matches {len(found)} {kind}s ({shown}{more}); give more of the id"
    )
