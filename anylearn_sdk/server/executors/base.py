"""The interface every executor implements (start, poll, cancel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RunSpec:
    """Everything an executor needs to run one task.

    Attributes:
        task_id: the task's id.
        cwd: folder the command runs in (the code checkout).
        command: a shell command line (``/bin/sh -c``).
        env: the environment for every process, without the per-rank variables.
        log_path: file that receives stdout and stderr of every rank.
        num_nodes: nodes; on the local executor every node is a group of local processes.
        nproc_per_node: processes per node.
        status_dir: folder where the executor keeps what outlives the server process (each
            rank's exit status).
    """

    task_id: str
    cwd: Path
    command: str
    env: dict[str, str] = field(repr=False)
    log_path: Path
    status_dir: Path
    num_nodes: int = 1
    nproc_per_node: int = 1


class Executor(Protocol):
    def start(self, spec: RunSpec) -> list[dict]:
        """Start the task; returns a JSON record per rank, for :meth:`attach` after a restart."""

    def attach(self, task_id: str, recorded: list[dict]) -> None:
        """Follow a task an earlier server process started, from :meth:`start`'s records."""

    def poll(self, task_id: str) -> int | str | None:
        """None while running; the task's exit code (the first non-zero rank's) once ended;
        ``"lost"`` if a rank vanished without an exit status (see the local executor)."""

    def cancel(self, task_id: str) -> None:
        """End every process of the task (SIGTERM, then SIGKILL after a grace period)."""

    def shutdown(self) -> None:
        """Forget running tasks without killing them (the server is stopping)."""
