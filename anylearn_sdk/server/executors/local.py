"""Run tasks as local process groups, one per rank, with torchrun's environment variables.

Every rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun sets them (PyTorch "torchrun (Elastic
Launch)", environment variables), so ``torch.distributed.init_process_group("env://")`` works.
The task fails as a whole when one rank exits non-zero: the other ranks are ended.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from anylearn_sdk.server.executors.base import RunSpec

CANCEL_GRACE_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalExecutor:
    """Runs each rank as the leader of its own process group (``start_new_session``)."""

    def __init__(self) -> None:
        self._procs: dict[str, list[subprocess.Popen]] = {}
        self._lock = threading.Lock()

    def start(self, spec: RunSpec) -> list[int]:
        world_size = spec.num_nodes * spec.nproc_per_node
        master_port = str(free_port())
        procs: list[subprocess.Popen] = []
        with open(spec.log_path, "ab") as log:
            for rank in range(world_size):
                env = dict(spec.env)
                env.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank % spec.nproc_per_node),
                    WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(spec.nproc_per_node),
                    NODE_RANK=str(rank // spec.nproc_per_node),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=master_port,
                )
                procs.append(
                    subprocess.Popen(
                        ["/bin/sh", "-c", spec.command],
                        cwd=spec.cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        with self._lock:
            self._procs[spec.task_id] = procs
        return [p.pid for p in procs]

    def poll(self, task_id: str) -> int | None:
        with self._lock:
            procs = self._procs.get(task_id)
        if procs is None:
            return -1
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    _kill_group(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait()
        elif any(c is None for c in codes):
            return None
        # Reap any leftover children of each rank's group (a rank that forked workers).
        for p in procs:
            _kill_group(p.pid, signal.SIGKILL)
        with self._lock:
            self._procs.pop(task_id, None)
        return failed[0] if failed else 0

    def cancel(self, task_id: str) -> None:
        with self._lock:
            procs = self._procs.pop(task_id, [])
        for p in procs:
            _kill_group(p.pid, signal.SIGTERM)

        def escalate() -> None:
            for p in procs:
                try:
                    p.wait(timeout=CANCEL_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    _kill_group(p.pid, signal.SIGKILL)

        threading.Thread(target=escalate, name=f"cancel-{task_id}", daemon=True).start()

    def shutdown(self) -> None:
        with self._lock:
            self._procs.clear()


def kill_stale(task_id: str, pids: list[int]) -> None:
    """End process groups a previous server process left for ``task_id``.

    A pid is only signalled if its environment still carries ``ANYLEARN_TASK_ID=<task_id>``,
    so a pid the kernel has since reused for another program is never touched.
    """
    marker = f"ANYLEARN_TASK_ID={task_id}".encode()
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            _kill_group(pid, signal.SIGKILL)


def write_python_shim(bin_dir: Path, python: str) -> None:
    """Make ``python`` and ``python3`` in ``bin_dir`` point at the mirror's interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(python)
