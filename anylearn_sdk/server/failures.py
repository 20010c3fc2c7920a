"""Why a task failed, in words a person can act on, read from the tail of its log.

An exit code alone ("exit code 2") sends people to the log. The reason is, in this order:

* a signal that ended the command (``sh`` reports 128 + N): ``killed by SIGKILL``, with a hint
  that the kernel's OOM killer sends that one;
* a command the shell could not find or run (exit 127 or 126, ``sh: 1: pythn: not found``);
* the exception line of the last Python traceback (``ZeroDivisionError: division by zero``);
* otherwise the last line the program printed, labelled as such (``exit code 2; last output:
  python: can't open file '...'``), since it may or may not say why.

Lines the backend itself wrote (``[anylearn] ...``) are never taken as the program's output.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

#: Bytes read from the end of the log.
TAIL_BYTES = 64 * 1024
#: Longest reason kept, characters.
MAX_REASON_CHARS = 300
_OWN_PREFIX = "[anylearn]"
_SHELL = re.compile(r"^(?:/bin/)?(?:ba|da)?sh: (?:line )?(?:\d+: )?(?P<what>.+?): (?P<why>.+)$")
_TRACEBACK = "Traceback (most recent call last):"


def tail(path: os.PathLike | str, nbytes: int) -> tuple[bytes, bool]:
    """The last ``nbytes`` of the file at ``path`` (b"" if it cannot be read), and whether the
    file is longer (the first line of the tail may then be cut)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - nbytes))
            return f.read(), size > nbytes
    except OSError:
        return b"", False


def _tail_lines(log: Path) -> list[str]:
    data, cut = tail(log, TAIL_BYTES)
    lines = data.decode("utf-8", errors="replace").splitlines()
    if cut and lines:
        lines = lines[1:]
    return [line.rstrip() for line in lines if not line.startswith(_OWN_PREFIX)]


def _signal_name(code: int) -> str | None:
    if 128 < code < 128 + 65:
        try:
            return signal.Signals(code - 128).name
        except ValueError:
            return f"signal {code - 128}"
    return None


def _exception_line(lines: list[str]) -> str | None:
    """The exception line of the last traceback: the first unindented line after it."""
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if not starts:
        return None
    for line in lines[starts[-1] + 1 :]:
        if line and not line[0].isspace():
            return line.strip()
    return None


#: Most lines of a traceback the experiment record keeps (its end: the innermost frames).
MAX_TRACEBACK_LINES = 60


def last_traceback(log: Path) -> tuple[str, str] | None:
    """The last Python traceback in the tail of ``log``: its text (at most 60 lines, the
    innermost kept) and its exception line; None if the tail has none."""
    lines = _tail_lines(log)
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if not starts:
        return None
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1 :]:
        block.append(line)
        if line and not line[0].isspace():
            break
    else:
        return None  # still being written
    if len(block) > MAX_TRACEBACK_LINES:
        block = [block[0], "  ...", *block[-(MAX_TRACEBACK_LINES - 2) :]]
    return "\n".join(block), block[-1].strip()


def failure_reason(log: Path, exit_code: int) -> str:
    """``exit code N: <reason>`` for a command that exited with ``exit_code`` (non-zero),
    the reason read from the tail of ``log`` (see the module docstring)."""
    lines = _tail_lines(log)
    reason = None
    name = _signal_name(exit_code)
    if name is not None:
        reason = f"killed by {name}"
        if name == "SIGKILL":
            reason += " (the kernel sends it when memory runs out)"
    if reason is None and exit_code in (126, 127):
        for line in reversed(lines):
            match = _SHELL.match(line.strip())
            if match:
                why = "command not found" if exit_code == 127 else match["why"]
                reason = f"{why}: {match['what']}"
                break
    if reason is None:
        reason = _exception_line(lines)
    text = f"exit code {exit_code}"
    if reason is not None:
        text += f": {reason}"
    else:
        last = next((line.strip() for line in reversed(lines) if line.strip()), None)
        text += f"; last output: {last}" if last else ""
    return text[:MAX_REASON_CHARS]
