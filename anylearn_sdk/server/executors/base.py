"""The interface between the scheduler and an executor, and the statuses it reports.

The scheduler decides *when* a task runs (quota groups, first come first served, restarts);
an executor decides *how*: it prepares the task (code, data, environment), places it, starts
its ranks, follows them and ends them. The scheduler sees a task only through
:meth:`Executor.poll`, whose answer is one of the statuses below, never a bare exit code or a
magic string. Nothing here imports an executor.

Lifecycle of one attempt, as the scheduler drives it (every call under its lock, all of them
fast; slow work runs on the executor's own threads)::

    submit(spec) -> poll: Preparing ... -> Running(handle) -> Running ... -> Exited | Lost
                                 \\-> Failed (never started)
    cancel(task_id) at any point; attach(task_id, handle) after a backend restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RunSpec:
    """What one attempt of a task runs: everything an executor needs, JSON-serializable
    (:meth:`to_json`), so it can be shipped to a node as it is.

    Attributes:
        task_id: the task's id.
        attempt: 1 for the first run, one more after each time it was lost.
        algorithm_id: whose git repository holds ``commit``.
        commit: the exact commit to check out (40 hex digits).
        entrypoint: the command before the hyperparameters, with ``$ANYLEARN_*`` placeholders.
        hyperparams: name to value, formatted with ``hyperparams_prefix`` and ``_delimiter``.
        output: the output folder, relative to the checkout.
        mounts: ``{"dataset"|"model"|"pretrain": {"ids": [...], "hyperparam_name": ...}}``.
        python: the mirror's interpreter.
        request: what one node of the task holds: ``{"cpu", "memory_mb", "gpu"}``.
        num_nodes: nodes; each runs ``nproc_per_node`` ranks.
        quota_group: the quota group's name (an executor may tie it to some nodes).
    """

    task_id: str
    attempt: int
    algorithm_id: str
    commit: str
    entrypoint: str
    hyperparams: dict[str, Any]
    hyperparams_prefix: str
    hyperparams_delimiter: str
    output: str
    mounts: dict[str, Any]
    python: str
    request: dict[str, float]
    num_nodes: int = 1
    nproc_per_node: int = 1
    quota_group: str = "default"

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.nproc_per_node

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**data)


# statuses -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preparing:
    """Not started yet: code, data or environment being prepared, or waiting to be placed.
    The task stays QUEUED with its quota held. ``runtime``, when given, updates the task's
    record (the environment being built, say)."""

    runtime: dict[str, Any] | None = None


@dataclass(frozen=True)
class Running:
    """Running. ``handle``, when given, is what the executor needs to follow the task after
    a backend restart (:meth:`Executor.attach`); the scheduler stores it with the task. The
    first Running of an attempt carries the handle, the final ``command`` line and the
    ``runtime`` record (interpreter, environment, devices, variables)."""

    handle: dict[str, Any] | None = None
    command: str | None = None
    runtime: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Exited:
    """Every rank ended; ``code`` is 0, or the first non-zero rank's exit status."""

    code: int


@dataclass(frozen=True)
class Lost:
    """The task's processes vanished without an exit status (their node or the machine died,
    their process group was killed); the scheduler may run the task again."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The task could not start (a bad commit, missing data, an environment that failed to
    build); ``reason`` says why in one line. It is not run again."""

    reason: str
    runtime: dict[str, Any] | None = None


Status = Preparing | Running | Exited | Lost | Failed


class Executor(Protocol):
    """Runs tasks. Implementations: ``local`` (process groups on the backend's machine) and
    ``ray`` (a placement group and one actor per node on a Ray cluster)."""

    #: The name given to ``--executor``.
    name: str
    #: GPU devices this executor hands out by index (the local machine's); 0 where another
    #: system assigns them (Ray). The ``default`` quota group gets this many.
    gpus: int

    def listen(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (from any thread) whenever a task's status may have changed, so
        the scheduler polls at once instead of on its next tick."""

    def has_room(self, spec: RunSpec) -> bool:
        """Whether ``spec`` can be placed now, beside what runs (the local executor counts its
        GPU devices); the scheduler admits a task only then. Quota groups are checked by the
        scheduler, not here."""

    def check(self, num_nodes: int, request: dict[str, float], quota_group: str = "") -> None:
        """Raise ValueError, naming the limit, if a task of ``quota_group`` could never be
        placed (a request bigger than any node, more nodes than there are)."""

    def submit(self, spec: RunSpec) -> None:
        """Begin an attempt: prepare, place and start it on the executor's own threads; returns
        at once. :meth:`poll` reports its progress."""

    def attach(self, task_id: str, handle: Any) -> None:
        """Follow an attempt an earlier backend process started, from the ``handle`` of its
        :class:`Running` status."""

    def recovered(self) -> None:
        """The scheduler attached to every task it follows: remove what the executor holds
        for no followed task (what a backend that died left behind)."""

    def poll(self, task_id: str) -> Status:
        """Where the attempt is (see the statuses above). A task the executor does not know is
        :class:`Lost`. After an :class:`Exited`, :class:`Lost` or :class:`Failed` answer the
        executor forgets the task."""

    def cancel(self, task_id: str) -> None:
        """End the attempt wherever it is: stop its preparation, end every rank (SIGTERM, then
        SIGKILL after a grace period) and release what it holds. Returns at once."""

    def shutdown(self) -> None:
        """Forget running tasks without ending them (the backend is stopping; a restarted one
        attaches to them again)."""
