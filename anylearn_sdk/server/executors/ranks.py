"""Ranks: one process group per rank, with torchrun's variables, under an exit-recording
supervisor; shared by the local executor and the Ray executor's node agents.

Every rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun sets them (PyTorch "torchrun (Elastic
Launch)", environment variables), so ``torch.distributed.init_process_group("env://")`` works.
Each rank's command runs under a small ``sh`` supervisor that writes the command's exit status
to ``<status_dir>/rank-<N>.exit``; a rank is recorded as (pid, creation time as psutil reads it
from the kernel), so a process that is no longer its parent can still follow it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from anylearn_sdk.server.executors.base import Exited, Lost, Running, Status

CANCEL_GRACE_SECONDS = 5.0
#: ``sh -c SUPERVISOR anylearn-rank COMMAND EXIT_FILE``: run COMMAND, record its status. The
#: command runs in the background and is waited for, so a SIGUSR1 to the supervisor (the
#: death signal of a rank that dies with its parent) ends the rank's whole group at once.
SUPERVISOR = (
    "trap 'kill -KILL 0' USR1; "
    '/bin/sh -c "$1" & wait $!; code=$?; '
    'echo "$code" > "$2.tmp" && mv -f "$2.tmp" "$2"; exit "$code"'
)
_PR_SET_PDEATHSIG = 1


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

    def poll(self) -> Exited | Lost | None:
        """None while running; how it ended otherwise."""
        if self.proc is not None:
            code = self.proc.poll()
            return None if code is None else Exited(code)
        if self.alive():
            return None
        try:
            return Exited(int(self.exit_file.read_text().strip()))
        except (OSError, ValueError):
            return Lost("a rank vanished without an exit status (its process group was killed)")

    def kill(self, sig: int) -> None:
        """Signal the rank's process group. A child not yet reaped keeps its pid reserved, so
        its group is signalled even after it exited (reaping what it forked); a rank followed
        after a restart only while its start time proves it is the same process."""
        if self.proc is not None or self.alive():
            kill_group(self.pid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Have the kernel send SIGUSR1 to this process when its parent dies (prctl(2))."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)


def spawn_ranks(
    *,
    command: str,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    status_dir: Path,
    node_rank: int,
    num_nodes: int,
    nproc_per_node: int,
    master_addr: str,
    master_port: int,
    die_with_parent: bool = False,
) -> list[Rank]:
    """Start node ``node_rank``'s ``nproc_per_node`` ranks of ``command``, each leading its own
    process group, their output appended to ``log_path``. ``die_with_parent``: end every rank
    when the calling process dies (a Ray node agent); otherwise ranks outlive it (the local
    backend, which attaches to them again after a restart)."""
    world_size = num_nodes * nproc_per_node
    status_dir.mkdir(parents=True, exist_ok=True)
    ranks: list[Rank] = []
    with open(log_path, "ab") as log:
        for local_rank in range(nproc_per_node):
            rank = node_rank * nproc_per_node + local_rank
            rank_env = dict(env)
            rank_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(local_rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(nproc_per_node),
                NODE_RANK=str(node_rank),
                MASTER_ADDR=master_addr,
                MASTER_PORT=str(master_port),
            )
            exit_file = status_dir / f"rank-{rank}.exit"
            exit_file.unlink(missing_ok=True)
            argv = ["/bin/sh", "-c", SUPERVISOR, "anylearn-rank", command, str(exit_file)]
            proc = subprocess.Popen(  # noqa: PLW1509 - prctl only, before exec
                argv,
                cwd=cwd,
                env=rank_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
            ranks.append(Rank(proc.pid, create_time(proc.pid), exit_file, proc))
    return ranks


def follow_ranks(ranks: list[Rank]) -> Status:
    """:class:`Running` while every rank runs or has exited 0; once one fails (or vanished)
    or all ended, every rank's group is killed (the task ends as a whole, fail fast) and the
    outcome is the first failure, a vanished rank first."""
    ends = [r.poll() for r in ranks]
    failed = [e for e in ends if isinstance(e, Lost) or (e is not None and e.code != 0)]
    if not failed and any(e is None for e in ends):
        return Running()
    for r in ranks:  # also reaps what each rank's group forked
        r.kill(signal.SIGKILL)
    for r in ranks:
        if r.proc is not None:
            r.proc.wait()
    lost = [e for e in failed if isinstance(e, Lost)]
    return (lost or failed or [Exited(0)])[0]


def end_ranks(ranks: list[Rank], grace: float = CANCEL_GRACE_SECONDS) -> threading.Thread:
    """SIGTERM every rank's group now, SIGKILL after ``grace`` seconds (on a thread, which is
    returned)."""
    for r in ranks:
        r.kill(signal.SIGTERM)

    def escalate() -> None:
        deadline = time.monotonic() + grace
        while any(r.alive() for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        for r in ranks:
            r.kill(signal.SIGKILL)
            if r.proc is not None:
                r.proc.wait()

    thread = threading.Thread(target=escalate, name="anylearn-end-ranks", daemon=True)
    thread.start()
    return thread
