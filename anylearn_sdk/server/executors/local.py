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
ended with the code in its file, or is :class:`Lost` if it vanished without writing one (its
whole process group was killed, or the machine restarted).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from anylearn_sdk.server.environments import EnvironmentBuildError
from anylearn_sdk.server.executors.base import (
    Exited,
    Failed,
    Lost,
    Preparing,
    Running,
    RunSpec,
    Status,
)
from anylearn_sdk.server.workspace import Prepared, PrepareError, Workspace

CANCEL_GRACE_SECONDS = 5.0
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


@dataclass
class _Job:
    """One attempt the executor knows: being prepared (``prepared``) or started (``ranks``)."""

    spec: RunSpec | None
    gpus: list[int]
    prepared: Future[Prepared] | None = None
    ranks: list[Rank] | None = None
    lost: str | None = None  # set for a recorded attempt that cannot be followed


class LocalExecutor:
    """Runs each rank as the leader of its own process group (``start_new_session``), on the
    backend's machine, in folders a :class:`Workspace` prepares.

    Args:
        workspace: prepares attempts (checkout, mounts, environment).
        gpus: GPU devices tasks may be given, as ``CUDA_VISIBLE_DEVICES`` indices 0..N-1.
        prepare_workers: attempts prepared at once.
    """

    name = "local"

    def __init__(self, workspace: Workspace, *, gpus: int = 0, prepare_workers: int = 2):
        self.workspace = workspace
        self.gpus = gpus
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=prepare_workers, thread_name_prefix="anylearn-prepare"
        )
        self._listener: Callable[[], object] = lambda: None

    def listen(self, callback: Callable[[], object]) -> None:
        self._listener = callback

    def _notify(self, _future: Future | None = None) -> None:
        self._listener()

    # placement -------------------------------------------------------------------------------
    def _free_gpus(self) -> list[int]:
        with self._lock:
            used = {g for job in self._jobs.values() for g in job.gpus}
        return [i for i in range(self.gpus) if i not in used]

    def has_room(self, spec: RunSpec) -> bool:
        return int(spec.request.get("gpu", 0)) <= len(self._free_gpus())

    def check(self, num_nodes: int, request: dict[str, float]) -> None:
        wanted = int(request.get("gpu", 0))
        if wanted > self.gpus:
            raise ValueError(f"gpu {wanted}: this backend's machine has {self.gpus} GPU(s)")

    # one attempt -----------------------------------------------------------------------------
    def submit(self, spec: RunSpec) -> None:
        job = _Job(spec, self._free_gpus()[: int(spec.request.get("gpu", 0))])
        with self._lock:
            self._jobs[spec.task_id] = job
        job.prepared = self._pool.submit(self._prepare, spec)
        job.prepared.add_done_callback(self._notify)

    def _prepare(self, spec: RunSpec) -> Prepared:
        prepared = self.workspace.prepare(spec)
        if prepared.build is not None:
            prepared.build.add_done_callback(self._notify)
        return prepared

    def attach(self, task_id: str, handle: Any) -> None:
        """Follow ranks an earlier backend process started. ``handle`` is ``{"ranks": [...],
        "gpus": [...]}``; older backends recorded the list of ranks alone, and the oldest only
        pids (those processes are ended and the attempt is lost)."""
        if isinstance(handle, list):
            handle = {"ranks": handle}
        recorded = (handle or {}).get("ranks") or []
        job = _Job(None, list((handle or {}).get("gpus") or []))
        if recorded and all(isinstance(r, dict) for r in recorded):
            job.ranks = [Rank.from_json(r) for r in recorded]
        else:
            kill_stale(task_id, [int(p) for p in recorded])
            job.lost = "its processes were recorded by an older backend and were ended"
        with self._lock:
            self._jobs[task_id] = job

    def poll(self, task_id: str) -> Status:
        with self._lock:
            job = self._jobs.get(task_id)
        if job is None:
            return Lost("the backend does not know its processes")
        if job.lost is not None:
            self._forget(task_id)
            return Lost(job.lost)
        if job.ranks is None:
            return self._start_when_prepared(task_id, job)
        return self._follow(task_id, job.ranks)

    def _start_when_prepared(self, task_id: str, job: _Job) -> Status:
        if not job.prepared.done():
            return Preparing()
        try:
            prepared = job.prepared.result()
        except PrepareError as err:
            self._forget(task_id)
            return Failed(str(err))
        runtime = {"environment": prepared.environment}
        venv = None
        if prepared.build is not None:
            if not prepared.build.done():
                return Preparing(runtime)
            try:
                venv = prepared.build.result()
            except EnvironmentBuildError as err:
                self._forget(task_id)
                return Failed(str(err), runtime)
        runtime = prepared.finish(venv)
        prepared.env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
        runtime["gpus"] = job.gpus
        prepared.paths.note(f"running: {prepared.command}")
        job.ranks = self._start_ranks(prepared)
        handle = {"ranks": [r.to_json() for r in job.ranks], "gpus": job.gpus}
        return Running(handle, prepared.command, runtime)

    def _start_ranks(self, prepared: Prepared) -> list[Rank]:
        spec, paths = prepared.spec, prepared.paths
        master_port = str(free_port())
        paths.status.mkdir(parents=True, exist_ok=True)
        ranks: list[Rank] = []
        with open(paths.log, "ab") as log:
            for rank in range(spec.world_size):
                env = dict(prepared.env)
                env.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank % spec.nproc_per_node),
                    WORLD_SIZE=str(spec.world_size),
                    LOCAL_WORLD_SIZE=str(spec.nproc_per_node),
                    NODE_RANK=str(rank // spec.nproc_per_node),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=master_port,
                )
                exit_file = paths.status / f"rank-{rank}.exit"
                exit_file.unlink(missing_ok=True)
                argv = ["/bin/sh", "-c", SUPERVISOR, "anylearn-rank", prepared.command]
                proc = subprocess.Popen(
                    [*argv, str(exit_file)],
                    cwd=paths.code,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                ranks.append(Rank(proc.pid, create_time(proc.pid), exit_file, proc))
        return ranks

    def _follow(self, task_id: str, ranks: list[Rank]) -> Status:
        ends = [r.poll() for r in ranks]
        failed = [e for e in ends if isinstance(e, Lost) or (e is not None and e.code != 0)]
        if not failed and any(e is None for e in ends):
            return Running()
        for r in ranks:  # the task ends as a whole; also reaps what each rank's group forked
            r.kill(signal.SIGKILL)
        for r in ranks:
            if r.proc is not None:
                r.proc.wait()
        self._forget(task_id)
        lost = [e for e in failed if isinstance(e, Lost)]
        return (lost or failed or [Exited(0)])[0]

    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._jobs.pop(task_id, None)

    def cancel(self, task_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(task_id, None)
        if job is None:
            return
        if job.prepared is not None:
            job.prepared.cancel()  # one still queued never starts; one running is ignored
        ranks = job.ranks or []
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

        if ranks:
            threading.Thread(target=escalate, name=f"cancel-{task_id}", daemon=True).start()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.workspace.environments.shutdown()
        with self._lock:
            self._jobs.clear()


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
