"""The scheduler thread: admits QUEUED tasks when their quota group has room, follows them.

Admission is first-come first-served per quota group: when the oldest queued task of a group
does not fit, no younger task of that group starts ahead of it. Every state change of a task
after creation happens here or in :meth:`Scheduler.cancel`, under one lock, so the API and the
loop never race on a task. The scheduler knows executors only through their interface
(:mod:`anylearn_sdk.server.executors.base`): it submits an admitted task and turns what
:meth:`~Executor.poll` reports into states. An admitted task stays QUEUED, its quota held,
while its executor prepares and places it (slow work on the executor's threads, outside this
lock), and becomes RUNNING when the executor reports it started.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from anylearn_sdk.server.db import Mirror, QuotaGroup, Token, TrainTask, utcnow
from anylearn_sdk.server.executors.base import (
    Executor,
    Exited,
    Failed,
    Lost,
    Preparing,
    Running,
    RunSpec,
)
from anylearn_sdk.server.failures import failure_reason
from anylearn_sdk.server.workspace import TaskPaths
from anylearn_sdk.states import TaskState
from anylearn_sdk.wire import RESOURCE_KEYS

log = logging.getLogger(__name__)
TICK_SECONDS = 0.2
#: States of a task its runner follows.
ACTIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)
#: Seconds between admissions when nothing woke the scheduler: another backend on the same
#: database may have freed room.
ADMISSION_SECONDS = 1.0
#: Key of the PostgreSQL advisory lock held while a backend admits tasks.
ADMISSION_LOCK = 0x616E7971  # "anyq"
#: Times a task whose processes were lost is run again before it fails.
DEFAULT_MAX_RESTARTS = 2


def held(request: dict, num_nodes: int) -> dict[str, float]:
    """What a task holds of its quota group: its request is per node, so ``num_nodes`` times
    it (each node of a Ray task reserves the whole request)."""
    return {k: request.get(k, 0) * num_nodes for k in RESOURCE_KEYS}


def fits(request: dict, allocated: dict, capacity: dict) -> bool:
    """True if ``request`` fits in ``capacity`` next to what is ``allocated``."""
    return all(allocated.get(k, 0) + request.get(k, 0) <= capacity.get(k, 0) for k in RESOURCE_KEYS)


def run_spec(session: Session, task: TrainTask) -> RunSpec:
    """What the executor runs for the current attempt of ``task``."""
    group = session.get(QuotaGroup, task.quota_group_id)
    return RunSpec(
        task_id=task.id,
        attempt=task.attempt,
        algorithm_id=task.algorithm_id,
        commit=task.commit,
        entrypoint=task.entrypoint,
        hyperparams=dict(task.hyperparams),
        hyperparams_prefix=task.hyperparams_prefix,
        hyperparams_delimiter=task.hyperparams_delimiter,
        output=task.output,
        mounts=dict(task.mounts),
        python=session.get(Mirror, task.mirror_id).python,
        request=dict(task.request),
        num_nodes=task.num_nodes,
        nproc_per_node=task.nproc_per_node,
        quota_group=group.name if group is not None else "",
    )


class Scheduler:
    def __init__(
        self,
        *,
        sessions: sessionmaker,
        tasks_root: Path,
        executor: Executor,
        runner_id: str,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
    ):
        self.sessions = sessions
        self.tasks_root = tasks_root
        self.executor = executor
        self.runner_id = runner_id
        self.max_restarts = max_restarts
        # Tasks this backend's executor runs or prepares (to end those cancelled elsewhere).
        self._following: set[str] = set()
        # Set when something changed that may let a queued task start.
        self._admission_due = True
        self._next_admission = 0.0  # monotonic time of the next admission in any case
        self.lock = threading.RLock()
        self.background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anylearn-bg")
        self._periodic: list[list] = []  # [interval seconds, next due (monotonic), callable]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        executor.listen(self._wake.set)

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="anylearn-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.background.shutdown(wait=True)
        self.executor.shutdown()

    def add_periodic(self, interval: float, job: Callable[[], object]) -> None:
        """Run ``job`` on the scheduler thread every ``interval`` seconds (first run at once)."""
        self._periodic.append([interval, 0.0, job])

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for entry in self._periodic:
            interval, due, job = entry
            if now >= due:
                entry[1] = now + interval
                try:
                    job()
                except Exception:  # noqa: BLE001 - housekeeping must not stop the scheduler
                    log.exception("periodic job %s failed", job)

    def wake(self) -> None:
        """Run a tick soon, admitting queued tasks (call after creating or freeing anything)."""
        self._admission_due = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive; the error is logged
                log.exception("scheduler tick failed")
            self._run_periodic()
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def recover(self) -> None:
        """Follow again the tasks this backend ran when it last stopped.

        Their processes outlive the backend. The executor attaches to each RUNNING one from
        the handle it gave when the task started, and the next ticks see it run on, end, or
        be lost (then re-queued, see :meth:`_lost`). One that was still being prepared is
        admitted again. (Rows from before tasks named their runner are this backend's.)
        """
        with self.lock, self.sessions() as session:
            ours = (TrainTask.runner == self.runner_id) | TrainTask.runner.is_(None)
            for task in session.scalars(
                select(TrainTask).where(TrainTask.state == TaskState.RUNNING, ours)
            ):
                self.executor.attach(task.id, task.pids)
                task.runner = self.runner_id
                self._following.add(task.id)
            for task in session.scalars(
                select(TrainTask).where(
                    TrainTask.state == TaskState.QUEUED, TrainTask.runner == self.runner_id
                )
            ):
                task.runner = None
            session.commit()
        self.executor.recovered()

    def _lost(self, session: Session, task: TrainTask, reason: str) -> None:
        """A task's processes vanished without an exit status (``reason``: its node died, its
        process group was killed, the machine restarted): run it again in the same working
        directory, so a script that checkpoints into its output resumes, up to
        ``max_restarts`` times."""
        if task.attempt > self.max_restarts:
            self._finish(
                session,
                task,
                TaskState.FAILED,
                None,
                f"its processes were lost on attempt {task.attempt} "
                f"(max_restarts={self.max_restarts}): {reason}",
            )
            return
        TaskPaths.of(self.tasks_root, task).note(
            f"attempt {task.attempt} lost its processes ({reason}); "
            f"queued again as attempt {task.attempt + 1}"
        )
        task.attempt += 1
        task.state = TaskState.QUEUED.value
        task.runner = None
        task.pids = []
        session.execute(delete(Token).where(Token.task_id == task.id))  # the next gets its own

    # one pass ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Follow this backend's tasks; then, if anything changed that could let a queued task
        start (a task created, ended or cancelled), admit what fits."""
        with self.lock, self.sessions() as session:
            mine = session.scalars(
                select(TrainTask).where(
                    TrainTask.runner == self.runner_id,
                    TrainTask.state.in_(ACTIVE) | TrainTask.id.in_(self._following),
                )
            ).all()
            for task in mine:
                if TaskState(task.state).is_terminal:  # cancelled through another backend
                    self.executor.cancel(task.id)
                    self._following.discard(task.id)
                elif not self._follow(session, task):
                    self._following.discard(task.id)
                    self._admission_due = True
            session.commit()
            now = time.monotonic()
            if not self._admission_due and now < self._next_admission:
                return
            self._admission_due = False
            self._next_admission = now + ADMISSION_SECONDS
            self._admit(session)
            session.commit()

    def _admit(self, session: Session) -> None:
        """Submit the queued tasks that fit, oldest first per quota group, in one transaction.

        What the groups hold is read from the database (RUNNING tasks and QUEUED ones a
        backend admitted), and on PostgreSQL the transaction first takes an advisory lock, so
        backends sharing one database admit one at a time and never overfill a group.
        """
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
        allocated: dict[str, dict] = defaultdict(lambda: defaultdict(float))

        def hold(group: str, request: dict, num_nodes: int) -> None:
            for k, amount in held(request, num_nodes).items():
                allocated[group][k] += amount

        holding = (TrainTask.state == TaskState.RUNNING) | (
            (TrainTask.state == TaskState.QUEUED) & TrainTask.runner.is_not(None)
        )
        for group, request, num_nodes in session.execute(
            select(TrainTask.quota_group_id, TrainTask.request, TrainTask.num_nodes).where(holding)
        ):
            hold(group, request, num_nodes)
        capacity = {g.id: g.capacity for g in session.scalars(select(QuotaGroup))}
        blocked: set[str] = set()
        queued = session.scalars(
            select(TrainTask)
            .where(TrainTask.state == TaskState.QUEUED, TrainTask.runner.is_(None))
            .order_by(TrainTask.created_at)
        ).all()
        for task in queued:
            group = task.quota_group_id
            if group in blocked:
                continue
            spec = run_spec(session, task)
            if not (
                fits(held(task.request, task.num_nodes), allocated[group], capacity.get(group))
                and self.executor.has_room(spec)
            ):
                blocked.add(group)
                continue
            self.executor.submit(spec)
            task.runner = self.runner_id
            self._following.add(task.id)
            hold(group, task.request, task.num_nodes)

    def _follow(self, session: Session, task: TrainTask) -> bool:
        """Turn what the executor reports for ``task`` into its state; True while it holds
        its quota (preparing or running)."""
        status = self.executor.poll(task.id)
        match status:
            case Preparing(runtime=runtime):
                if runtime is not None and runtime != task.runtime:
                    task.runtime = runtime  # names the environment while it is built
                return True
            case Running(handle=handle, command=command, runtime=runtime):
                if handle is not None:
                    task.pids = handle
                if task.state != TaskState.RUNNING:
                    task.state = TaskState.RUNNING.value
                    task.started_at = utcnow()
                    task.command = command
                    task.runtime = runtime or {}
                return True
            case Exited(code=0):
                self._finish(session, task, TaskState.SUCCEEDED, 0, None)
            case Exited(code=code):
                reason = failure_reason(TaskPaths.of(self.tasks_root, task).log, code)
                self._finish(session, task, TaskState.FAILED, code, reason)
            case Lost(reason=reason):
                self._lost(session, task, reason)
            case Failed(reason=reason, runtime=runtime):
                if runtime is not None:
                    task.runtime = runtime
                self._finish(session, task, TaskState.FAILED, None, reason)
        return False

    def _finish(
        self,
        session: Session,
        task: TrainTask,
        state: TaskState,
        code: int | None,
        error: str | None,
    ) -> None:
        task.state = state.value
        task.exit_code = code
        task.error = error
        task.finished_at = utcnow()
        session.execute(delete(Token).where(Token.task_id == task.id))
        TaskPaths.of(self.tasks_root, task).note(
            f"task {state.value}" + (f": {error}" if error else "")
        )

    # cancel --------------------------------------------------------------------------------
    def cancel(self, task_id: str) -> None:
        """Cancel a task: a QUEUED one never starts (its preparation is dropped); a RUNNING one
        has every rank ended."""
        with self.lock, self.sessions() as session:
            task = session.get(TrainTask, task_id)
            if task is None or TaskState(task.state).is_terminal:
                return
            if task.runner == self.runner_id:
                self.executor.cancel(task.id)
                self._following.discard(task.id)
            # else: its runner sees it CANCELLED on its next tick and ends it
            self._finish(session, task, TaskState.CANCELLED, None, "cancelled by the user")
            session.commit()
        self.wake()
