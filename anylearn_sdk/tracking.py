"""Metrics, parameters and tags from inside a training script; standard library only.

    from anylearn_sdk import log_metrics, log_params, set_tags
    log_params({"lr": 0.1, "optimizer": "sgd"})
    log_metrics({"loss": 0.31, "acc": 0.9}, step=100)
    set_tags({"stage": "baseline"})

Each call appends JSON lines to a file; no network is used and nothing but the standard
library is imported, so the training process pays nothing it does not need. Inside a task the
executor names the file (``ANYLEARN_TRACKING_FILE``) and collects it into the task's record;
outside a task (a laptop run) the lines go to ``anylearn-runs/<run>/tracking.jsonl`` under the
working folder (``ANYLEARN_RUN_DIR`` chooses another folder), so the same script runs
unchanged in both places.

One line per value::

    {"kind": "metric", "key": "loss", "value": 0.31, "step": 100, "time": 1764560000.0, "rank": 0}
    {"kind": "param", "key": "lr", "value": "0.1", "time": ..., "rank": 0}
    {"kind": "tag", "key": "stage", "value": "baseline", "time": ..., "rank": 0}

Keys follow MLflow's rules (letters, digits, ``_ - . / `` and spaces, at most 250 characters),
so a record exports to MLflow as it is. Metric values are finite numbers; parameter values
are strings, numbers or booleans (kept as text, at most 6000 characters); tag values text (at
most 5000). Anything else raises :class:`~anylearn_sdk.errors.InvalidArgumentError` naming
the key and the value, and nothing of that call is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from anylearn_sdk.errors import InvalidArgumentError

#: Set by the executor inside a task: the file this module appends to.
TRACKING_FILE_ENV = "ANYLEARN_TRACKING_FILE"
#: Outside a task: the folder of this run (default ``anylearn-runs/run-<time>-<pid>``).
RUN_DIR_ENV = "ANYLEARN_RUN_DIR"
TRACKING_FILE_NAME = "tracking.jsonl"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-./ ]{1,250}$")
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000

_lock = threading.Lock()
_path: Path | None = None
_next_step: dict[str, int] = {}


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Record ``metrics`` (key to a finite number) at ``step``.

    ``step`` is a whole number ≥ 0; None takes, per key, one more than the last step logged
    for it in this process (0 the first time), as a loop that logs once per epoch expects.

    Raises:
        InvalidArgumentError: a key breaks the rules above, a value is not a finite number
            (NaN, infinity, a string, a bool), or ``step`` is not a whole number ≥ 0.
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise InvalidArgumentError(f"step {step!r}: use a whole number >= 0, or None")
    entries = []
    for key, value in _items(metrics, "metrics"):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidArgumentError(f"metric {key!r} = {value!r}: use a finite number")
        entries.append((key, float(value)))
    with _lock:
        lines = []
        for key, value in entries:
            at = step if step is not None else _next_step.get(key, 0)
            _next_step[key] = at + 1
            lines.append({"kind": "metric", "key": key, "value": value, "step": at})
        _append(lines)


def log_params(params: Mapping[str, Any]) -> None:
    """Record ``params`` (key to a string, number or bool), the run's hyperparameters.

    Raises:
        InvalidArgumentError: a key breaks the rules above, or a value is of another type or
            longer than 6000 characters as text.
    """
    lines = []
    for key, value in _items(params, "params"):
        if not isinstance(value, str | int | float | bool) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise InvalidArgumentError(
                f"param {key!r} = {value!r}: use a string, a finite number or a bool"
            )
        text = str(value)
        if len(text) > MAX_PARAM_CHARS:
            raise InvalidArgumentError(
                f"param {key!r}: {len(text)} characters; at most {MAX_PARAM_CHARS}"
            )
        lines.append({"kind": "param", "key": key, "value": text})
    with _lock:
        _append(lines)


def set_tags(tags: Mapping[str, str]) -> None:
    """Record ``tags`` (key to text) that describe the run.

    Raises:
        InvalidArgumentError: a key breaks the rules above, or a value is not text or is
            longer than 5000 characters.
    """
    lines = []
    for key, value in _items(tags, "tags"):
        if not isinstance(value, str) or len(value) > MAX_TAG_CHARS:
            raise InvalidArgumentError(
                f"tag {key!r} = {value!r:.60}: use text of at most {MAX_TAG_CHARS} characters"
            )
        lines.append({"kind": "tag", "key": key, "value": value})
    with _lock:
        _append(lines)


def tracking_file() -> Path:
    """The file this process appends to (see the module docstring); its folder is created."""
    global _path
    if _path is None:
        named = os.environ.get(TRACKING_FILE_ENV)
        if named:
            _path = Path(named)
        else:
            run_dir = os.environ.get(RUN_DIR_ENV) or str(
                Path("anylearn-runs") / f"run-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
            )
            _path = Path(run_dir) / TRACKING_FILE_NAME
        _path.parent.mkdir(parents=True, exist_ok=True)
    return _path


def _items(values: Mapping[str, Any], what: str) -> list[tuple[str, Any]]:
    if not isinstance(values, Mapping):
        raise InvalidArgumentError(f"{what} {values!r:.60}: give a mapping of key to value")
    for key in values:
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise InvalidArgumentError(
                f"key {key!r:.60}: use 1 to 250 letters, digits, '_', '-', '.', '/' or spaces"
            )
    return list(values.items())


def _append(lines: list[dict[str, Any]]) -> None:
    """Append ``lines`` in one write (O_APPEND), so ranks sharing the file never interleave
    within a line. Caller holds ``_lock``."""
    if not lines:
        return
    now = time.time()
    rank = int(os.environ.get("RANK", "0") or 0)
    data = "".join(
        json.dumps({**line, "time": now, "rank": rank}, ensure_ascii=False) + "\n" for line in lines
    ).encode()
    fd = os.open(tracking_file(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
