"""Run tasks as local process groups, one per rank, with torchrun's environment variables.

Every rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun sets them (PyTorch "torchrun (Elastic
Launch)", environment variables), so ``torch.distributed.init_process_group("env://")`` works.
The task fails as a whole when one rank exits non-zero: the other ranks are ended.

Each rank's command runs under a small ``sh`` supervisor that writes the command's exit status
to ``<status_dir>/rank-<N>.exit``, and each rank is recorded as (pid, creation time, as psutil
reads it from the kernel). A server that restarts is no longer the parent of its task
processes, yet can still follow them (:meth:`LocalExecutor.attach`): a rank is running while a
process with that pid *and* creation time lives (a reused pid is a different process), has
ended with the code in its file, or is :data:`LOST` if it vanished without writing one (its
whole process group was killed, or the machine restarted).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from anylearn_sdk.server.executors.base import RunSpec

CANCEL_GRACE_SECONDS = 5.0
#: What :meth:`LocalExecutor.poll` answers for a task one of whose ranks vanished unrecorded.
LOST = "lost"
#: ``sh -c SUPERVISOR anylearn-rank COMMAND EXIT_FILE``: run COMMAND, record its status.
SUPERVISOR = (
    '/bin/sh -c "$1"; code=$?; echo "$code" > "$2.tmp" && mv -f "$2.tmp" "$2"; exit "$code"'
)


def create_time(pid: int) -> float | None:
    """When process ``pid`` was created (seconds since the epoch, as psutil derives it from
    the kernel's start time, so equal for the same process at every call), or None if it is
    gone or a zombie (it has ended)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


@dataclass
class Rank:
    """One rank: the pid of its process-group leader, its creation time and its exit file."""

    pid: int
    create_time: float | None
    exit_file: Path
    proc: subprocess.Popen | None = None  # set while this server process is its parent

    def to_json(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "exit_file": str(self.exit_file)}

    @classmethod
    def from_json(cls, data: dict) -> Rank:
        """A recorded rank. Records of older servers (``start_time`` in clock ticks) carry no
        creation time: such a rank is judged by its exit file alone."""
        return cls(int(data["pid"]), data.get("create_time"), Path(data["exit_file"]))

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.create_time is not None and create_time(self.pid) == self.create_time

    def poll(self) -> int | str | None:
        """None while running, the exit code once ended, or :data:`LOST`."""
        if self.proc is not None:
            return self.proc.poll()
        if self.alive():
            return None
        try:
            return int(self.exit_file.read_text().strip())
        except (OSError, ValueError):
            return LOST

    def kill(self, sig: int) -> None:
        """Signal the rank's process group. A child not yet reaped keeps its pid reserved, so
        its group is signalled even after it exited (reaping what it forked); a rank followed
        after a restart only while its start time proves it is the same process."""
        if self.proc is not None or self.alive():
            _kill_group(self.pid, sig)


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
        self._ranks: dict[str, list[Rank]] = {}
        self._lock = threading.Lock()

    def start(self, spec: RunSpec) -> list[dict]:
        world_size = spec.num_nodes * spec.nproc_per_node
        master_port = str(free_port())
        spec.status_dir.mkdir(parents=True, exist_ok=True)
        ranks: list[Rank] = []
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
                exit_file = spec.status_dir / f"rank-{rank}.exit"
                exit_file.unlink(missing_ok=True)
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", SUPERVISOR, "anylearn-rank", spec.command, str(exit_file)],
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                ranks.append(Rank(proc.pid, create_time(proc.pid), exit_file, proc))
        with self._lock:
            self._ranks[spec.task_id] = ranks
        return [r.to_json() for r in ranks]

    def attach(self, task_id: str, recorded: list[dict]) -> None:
        """Follow ranks an earlier server process started (``start``'s records)."""
        with self._lock:
            self._ranks[task_id] = [Rank.from_json(r) for r in recorded]

    def poll(self, task_id: str) -> int | str | None:
        with self._lock:
            ranks = self._ranks.get(task_id)
        if ranks is None:
            return LOST
        codes = [r.poll() for r in ranks]
        ended = [c for c in codes if c is not None and c != 0]
        if not ended and any(c is None for c in codes):
            return None
        for r in ranks:  # the task ends as a whole; also reaps what each rank's group forked
            r.kill(signal.SIGKILL)
        for r in ranks:
            if r.proc is not None:
                r.proc.wait()
        with self._lock:
            self._ranks.pop(task_id, None)
        lost = [c for c in ended if c == LOST]
        return LOST if lost else (ended[0] if ended else 0)

    def cancel(self, task_id: str) -> None:
        with self._lock:
            ranks = self._ranks.pop(task_id, [])
        for r in ranks:
            r.kill(signal.SIGTERM)

        def escalate() -> None:
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while any(r.alive() for r in ranks) and time.monotonic() < deadline:
                time.sleep(0.1)
            for r in ranks:
                r.kill(signal.SIGKILL)
                if r.proc is not None:
                    r.proc.wait()

        threading.Thread(target=escalate, name=f"cancel-{task_id}", daemon=True).start()

    def shutdown(self) -> None:
        with self._lock:
            self._ranks.clear()


def kill_stale(task_id: str, pids: list[int]) -> None:
    """End process groups a previous server process left for ``task_id``.

    A pid is only signalled if its environment still carries ``ANYLEARN_TASK_ID=<task_id>``,
    so a pid the kernel has since reused for another program is never touched.
    """
    for pid in pids:
        try:
            environ = psutil.Process(pid).environ()
        except psutil.Error:
            continue
        if environ.get("ANYLEARN_TASK_ID") == task_id:
            _kill_group(pid, signal.SIGKILL)


def detect_gpus() -> int:
    """How many GPUs ``nvidia-smi -L`` lists on this machine (0 without the tool)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def write_python_shim(bin_dir: Path, python: str) -> None:
    """Make ``python`` and ``python3`` in ``bin_dir`` run ``python``.

    They are ``exec`` scripts, not symlinks: Python finds a venv's ``pyvenv.cfg`` next to the
    path it was started by, so a symlink elsewhere to a venv's interpreter would run the base
    interpreter without the venv's packages.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        shim = bin_dir / name
        if shim.is_symlink() or shim.exists():
            shim.unlink()
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} "$@"\n')
        shim.chmod(0o755)
