"""Progress reporting: a callback protocol, a tqdm implementation, and a silent one.

Phases, in the order a dataset goes through them: ``scanning`` (unit: files), ``hashing``,
``uploading`` and ``server verifying`` (unit: bytes). A phase's key is the phase word, a space
and a label (``"hashing data"``), so phases of several datasets can run at once.

Library users pass their own :class:`ProgressCallback`; by default the SDK shows tqdm bars on
stderr (one per phase, in bytes, sharing one lock across threads, as huggingface_hub does) and
one-line messages. ``ANYLEARN_DISABLE_PROGRESS_BARS`` (true: ``1``, ``true``, ``yes``, ``on``)
turns the bars off while keeping the one-line messages on stderr; ``progress=False`` silences both
(messages then go to the ``anylearn_sdk`` logger only).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Protocol

from tqdm.auto import tqdm

from anylearn_sdk.config import progress_bars_disabled

log = logging.getLogger("anylearn_sdk")

SCANNING = "scanning"
HASHING = "hashing"
UPLOADING = "uploading"
VERIFYING = "server verifying"


class ProgressCallback(Protocol):
    def phase_start(self, phase: str, total: int | None, unit: str = "B") -> None:
        """A phase begins; ``total`` in ``unit`` (bytes unless said otherwise) if known."""

    def advance(self, phase: str, amount: int) -> None:
        """``amount`` more bytes of ``phase`` are done (called from worker threads too)."""

    def phase_end(self, phase: str) -> None:
        """The phase is over."""

    def message(self, text: str) -> None:
        """A one-line human message (what was skipped, what was uploaded)."""


class SilentProgress:
    """Reports nothing but log records."""

    def phase_start(self, phase: str, total: int | None, unit: str = "B") -> None:
        pass

    def advance(self, phase: str, amount: int) -> None:
        pass

    def phase_end(self, phase: str) -> None:
        pass

    def message(self, text: str) -> None:
        log.info("%s", text)


class TqdmProgress:
    """One tqdm bar per phase on stderr (unless ``bars`` is False); messages above the bars."""

    def __init__(self, bars: bool = True) -> None:
        self.bars = bars
        self._bars: dict[str, tqdm] = {}
        self._lock = threading.RLock()
        tqdm.set_lock(self._lock)

    def phase_start(self, phase: str, total: int | None, unit: str = "B") -> None:
        if not self.bars:
            return
        with self._lock:
            self._bars[phase] = tqdm(
                total=total,
                desc=phase,
                unit=unit,
                unit_scale=True,
                unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )

    def advance(self, phase: str, amount: int) -> None:
        with self._lock:
            bar = self._bars.get(phase)
            if bar is not None:
                bar.update(amount)

    def phase_end(self, phase: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase, None)
            if bar is not None:
                bar.close()

    def message(self, text: str) -> None:
        log.info("%s", text)
        tqdm.write(text, file=sys.stderr)


def resolve_progress(progress: bool | ProgressCallback | None) -> ProgressCallback:
    """``True``/None → tqdm (bars unless disabled by the environment); ``False`` → silent."""
    if progress is None or progress is True:
        return TqdmProgress(bars=not progress_bars_disabled())
    if progress is False:
        return SilentProgress()
    return progress
