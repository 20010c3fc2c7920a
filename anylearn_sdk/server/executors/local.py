"""Run tasks as local process groups on the backend's machine, one per rank.

Ranks, their torchrun variables and their exit-recording supervisor are those of
:mod:`anylearn_sdk.server.executors.ranks`; every node of a task is a group of local
processes. The task fails as a whole when one rank exits non-zero: the other ranks are ended.

Ranks outlive the backend. A backend that restarts is no longer their parent, yet can still
follow them (:meth:`LocalExecutor.attach`): a rank is running while a process with its pid
*and* creation time lives (a reused pid is a different process), has ended with the code in
its exit file, or is :class:`Lost` if it vanished without writing one (its whole process group
was killed, or the machine restarted).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil

from anylearn_sdk.server.environments import EnvironmentBuildError
from anylearn_sdk.server.executors.base import (
    Failed,
    Lost,
    Preparing,
    Running,
    RunSpec,
    Status,
)
from anylearn_sdk.server.executors.ranks import (
    Rank,
    end_ranks,
    follow_ranks,
    free_port,
    kill_group,
    spawn_ranks,
)
from anylearn_sdk.server.workspace import Prepared, PrepareError, Workspace


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

    def check(self, num_nodes: int, request: dict[str, float], quota_group: str = "") -> None:
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

    def recovered(self) -> None:
        pass  # ranks a dead backend left are found by attach (their records) or never started

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
        spec = prepared.spec
        master_port = free_port()
        return [
            rank
            for node_rank in range(spec.num_nodes)  # every node is a group of local processes
            for rank in spawn_ranks(
                command=prepared.command,
                env=prepared.env,
                cwd=prepared.paths.code,
                log_path=prepared.paths.log,
                status_dir=prepared.paths.status,
                node_rank=node_rank,
                num_nodes=spec.num_nodes,
                nproc_per_node=spec.nproc_per_node,
                master_addr="127.0.0.1",
                master_port=master_port,
            )
        ]

    def _follow(self, task_id: str, ranks: list[Rank]) -> Status:
        status = follow_ranks(ranks)
        if not isinstance(status, Running):
            self._forget(task_id)
        return status

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
        if job.ranks:
            end_ranks(job.ranks)

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
            kill_group(pid, signal.SIGKILL)


def detect_gpus() -> int:
    """How many GPUs ``nvidia-smi -L`` lists on this machine (0 without the tool)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
