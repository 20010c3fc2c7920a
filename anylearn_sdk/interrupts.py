"""Ctrl-C during a long call: stop the worker threads fast, say so once, raise once.

The worker threads of hashing and uploading cannot be interrupted by the signal, and leaving a
``ThreadPoolExecutor`` block waits for all its queued work. So the pools used here stop on an
event the workers check between reads, drop queued work, and join the threads while a second
Ctrl-C is ignored; the caller then raises the first ``KeyboardInterrupt``, alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

#: What a call interrupted by Ctrl-C prints (the hash cache and upload journal keep its work).
INTERRUPTED_MESSAGE = "interrupted; run again to resume"


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore further Ctrl-C while this block runs (on the main thread only): the cleanup
    after a first Ctrl-C then ends in one ``KeyboardInterrupt``, not a chain of them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def stoppable_pool(workers: int, name: str) -> Iterator[tuple[ThreadPoolExecutor, threading.Event]]:
    """A thread pool and the event its workers check between reads.

    On ``KeyboardInterrupt`` (or any error) in the block the event is set, so every worker ends
    at its next check, queued work is dropped, and the threads are joined (a second Ctrl-C
    ignored) before the exception goes on. Without this, leaving a pool waits for all its
    queued work: the whole upload, or the hashing of every file.
    """
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield pool, stop
    except BaseException:
        stop.set()
        with sigint_ignored():
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
