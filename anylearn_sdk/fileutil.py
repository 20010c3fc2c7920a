"""Small file helpers shared by the SDK and the backend."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_private_json(path: Path, data: dict) -> None:
    """Write JSON to ``path`` atomically, mode 0600 from the first byte (tokens live in such files).

    The parent folder is created with mode 0700 if missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
