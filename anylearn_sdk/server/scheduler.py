"""The scheduler thread: admits QUEUED tasks when their quota group has room, watches RUNNING.

Admission is first-come first-served per quota group: when the oldest queued task of a group
does not fit, no younger task of that group starts ahead of it. Every state change of a task
after creation happens here or in :meth:`Scheduler.cancel`, under one lock, so the API and the
loop never race on a task.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from anylearn_sdk.protocol import (
    MOUNT_ENV_VARS,
    ManifestEntry,
    format_hyperparams,
    substitute_placeholders,
)
from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.db import Mirror, QuotaGroup, Resource, TrainTask, utcnow
from anylearn_sdk.server.environments import (
    REQUIREMENTS_FILE,
    EnvironmentBuildError,
    Environments,
)
from anylearn_sdk.server.executors.base import Executor, RunSpec
from anylearn_sdk.server.executors.local import LOST, kill_stale, write_python_shim
from anylearn_sdk.server.failures import failure_reason
from anylearn_sdk.server.objects import ObjectStore
from anylearn_sdk.states import ResourceState, TaskState
from anylearn_sdk.wire import RESOURCE_KEYS

log = logging.getLogger(__name__)
TICK_SECONDS = 0.2
#: Variables of the server's environment that a task inherits; nothing else leaks (no tokens).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "USER")
#: Times a task whose processes were lost is run again before it fails.
DEFAULT_MAX_RESTARTS = 2


def fits(request: dict, allocated: dict, capacity: dict) -> bool:
    """True if ``request`` fits in ``capacity`` next to what is ``allocated``."""
    return all(allocated.get(k, 0) + request.get(k, 0) <= capacity.get(k, 0) for k in RESOURCE_KEYS)


class TaskPaths:
    """A task's working directory: ``tasks/<id>/{code,task.log,.anylearn}``."""

    LOG_NAME = "task.log"

    def __init__(self, tasks_root: Path, task: TrainTask):
        self.root = tasks_root / task.id
        self.code = self.root / "code"
        self.log = self.root / self.LOG_NAME
        self.bin = self.root / ".anylearn" / "bin"
        self.status = self.root / ".anylearn" / "status"
        self.output = self.code / task.output

    def note(self, text: str) -> None:
        """Append ``[anylearn] text`` to the task's log, if its folder exists."""
        if self.root.is_dir():
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"[anylearn] {text}\n")


def _search_path(*dirs: Path) -> str:
    """``PATH`` for a task: ``dirs`` first, then the server's own ``PATH``."""
    return os.pathsep.join([*map(str, dirs), os.environ.get("PATH", "/usr/bin:/bin")])


@dataclass
class _Prepared:
    """A task checked out and ready to start once its environment (if any) is built."""

    spec: RunSpec
    python: str  # the mirror's interpreter
    environment: str | None  # the environment's key; None without a requirements.txt
    build: Future[Path] | None


class PrepareError(RuntimeError):
    """The task cannot start (bad commit, output path taken in the commit, missing data)."""


class Scheduler:
    def __init__(
        self,
        *,
        sessions: sessionmaker,
        objects: ObjectStore,
        repos_root: Path,
        tasks_root: Path,
        materialized_root: Path,
        executor: Executor,
        environments: Environments,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        gpus: int = 0,
    ):
        self.sessions = sessions
        self.objects = objects
        self.repos_root = repos_root
        self.tasks_root = tasks_root
        self.materialized_root = materialized_root
        self.executor = executor
        self.environments = environments
        self.max_restarts = max_restarts
        self.gpus = gpus
        # Tasks prepared and waiting for their environment.
        self._pending: dict[str, _Prepared] = {}
        # Set when something changed that may let a queued task start.
        self._admission_due = True
        self.lock = threading.RLock()
        self.background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anylearn-bg")
        self._periodic: list[list] = []  # [interval seconds, next due (monotonic), callable]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        self.environments.shutdown()
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
        """Follow again the tasks that were RUNNING when the server last stopped.

        Their processes outlive the server (each rank leads its own session). A task whose
        ranks were recorded is attached to, and the next ticks see it run on, end with its
        exit code, or be lost (then re-queued, see :meth:`_lost`). Rows from before ranks
        were recorded have only pids: those processes are ended and the task is lost.
        """
        with self.lock, self.sessions() as session:
            for task in session.scalars(
                select(TrainTask).where(TrainTask.state == TaskState.RUNNING)
            ):
                recorded = task.pids or []
                if recorded and all(isinstance(r, dict) for r in recorded):
                    self.executor.attach(task.id, recorded)
                else:
                    kill_stale(task.id, [int(p) for p in recorded])
                    self._lost(session, task)
            session.commit()

    def _lost(self, session: Session, task: TrainTask) -> None:
        """A running task's processes vanished without an exit status (its process group was
        killed, or the machine restarted): run it again in the same working directory, so a
        script that checkpoints into its output resumes, up to ``max_restarts`` times."""
        if task.attempt > self.max_restarts:
            self._finish(
                session,
                task,
                TaskState.FAILED,
                None,
                f"its processes were lost on attempt {task.attempt} "
                f"(max_restarts={self.max_restarts})",
            )
            return
        TaskPaths(self.tasks_root, task).note(
            f"attempt {task.attempt} lost its processes; queued again as attempt {task.attempt + 1}"
        )
        task.attempt += 1
        task.state = TaskState.QUEUED.value
        task.pids = []

    # one pass ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Follow running tasks; then, if anything changed that could let a queued task start
        (a task created, ended or cancelled, an environment being built), admit what fits."""
        with self.lock, self.sessions() as session:
            allocated: dict[str, dict] = defaultdict(lambda: defaultdict(float))
            gpus_in_use: set[int] = set()

            def hold(group: str, request: dict, gpus: list[int]) -> None:
                for k in RESOURCE_KEYS:
                    allocated[group][k] += request.get(k, 0)
                gpus_in_use.update(gpus)

            for task in session.scalars(
                select(TrainTask).where(TrainTask.state == TaskState.RUNNING)
            ):
                code = self.executor.poll(task.id)
                if code is None:
                    hold(task.quota_group_id, task.request, task.runtime.get("gpus") or [])
                    continue
                self._admission_due = True
                if code == LOST:
                    self._lost(session, task)
                elif code == 0:
                    self._finish(session, task, TaskState.SUCCEEDED, 0, None)
                else:
                    reason = failure_reason(TaskPaths(self.tasks_root, task).log, code)
                    self._finish(session, task, TaskState.FAILED, code, reason)
            session.commit()
            if not (self._admission_due or self._pending):
                return
            self._admission_due = False
            capacity = {g.id: g.capacity for g in session.scalars(select(QuotaGroup))}
            blocked: set[str] = set()
            queued = session.execute(
                select(TrainTask.id, TrainTask.quota_group_id, TrainTask.request)
                .where(TrainTask.state == TaskState.QUEUED)
                .order_by(TrainTask.created_at)
            ).all()
            for task_id, group, request in queued:
                if group in blocked:
                    continue
                free_gpus = [i for i in range(self.gpus) if i not in gpus_in_use]
                wanted_gpus = int(request.get("gpu", 0))
                if wanted_gpus > len(free_gpus) or not fits(
                    request, allocated[group], capacity.get(group, {})
                ):
                    blocked.add(group)
                    continue
                task = session.get(TrainTask, task_id)
                self._launch(session, task, free_gpus[:wanted_gpus])
                if task.state in (TaskState.RUNNING, TaskState.QUEUED):
                    # running, or prepared and waiting for its environment
                    hold(group, request, free_gpus[:wanted_gpus])
                session.commit()

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
        TaskPaths(self.tasks_root, task).note(
            f"task {state.value}" + (f": {error}" if error else "")
        )

    # starting a task -----------------------------------------------------------------------
    def _launch(self, session: Session, task: TrainTask, gpus: list[int]) -> None:
        """Prepare ``task`` (once), wait for its environment, then start it on ``gpus``.

        A task whose environment is still being built stays QUEUED, and the caller keeps its
        request (and these GPUs) reserved, so no younger task of its group overtakes it.
        """
        paths = TaskPaths(self.tasks_root, task)
        if task.id not in self._pending:
            try:
                self._pending[task.id] = self._prepare(session, task, paths)
            except PrepareError as err:
                self._finish(session, task, TaskState.FAILED, None, str(err))
                return
            # The record names its environment while it is built, and if the build fails.
            task.runtime = {"environment": self._pending[task.id].environment}
        prepared = self._pending[task.id]
        spec, python = prepared.spec, prepared.python
        if prepared.build is not None:
            if not prepared.build.done():
                return
            try:
                venv = prepared.build.result()
            except EnvironmentBuildError as err:
                del self._pending[task.id]
                self._finish(session, task, TaskState.FAILED, None, str(err))
                return
            python = str(venv / "bin" / "python")
            spec.env.update(PATH=_search_path(paths.bin, venv / "bin"), VIRTUAL_ENV=str(venv))
        del self._pending[task.id]
        write_python_shim(paths.bin, python)
        spec.env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        task.runtime = {
            "environment": prepared.environment,
            "python": python,
            "gpus": gpus,
            "env": spec.env,
        }
        paths.note(f"running: {spec.command}")
        task.command = spec.command
        task.pids = self.executor.start(spec)
        task.state = TaskState.RUNNING.value
        task.started_at = utcnow()

    def _mount_path(self, session: Session, kind: str, ref: str) -> Path:
        if kind == "pretrain":
            earlier = session.get(TrainTask, ref)
            if earlier is None:
                raise PrepareError(f"pretrain task {ref} no longer exists")
            return TaskPaths(self.tasks_root, earlier).output
        res = session.get(Resource, ref)
        if res is None or res.state != ResourceState.READY:
            raise PrepareError(f"{kind} {ref} is not READY")
        dest = self.materialized_root / res.id
        self.objects.materialize((ManifestEntry.from_json(e) for e in res.manifest), dest)
        return dest

    def _checkout(self, task: TrainTask, paths: TaskPaths) -> None:
        try:
            gitrepos.checkout(self.repos_root / f"{task.algorithm_id}.git", task.commit, paths.code)
        except RuntimeError as err:
            raise PrepareError(str(err)) from err
        if paths.output.is_symlink() or (paths.output.exists() and any(paths.output.iterdir())):
            raise PrepareError(
                f"output {task.output!r} exists in commit {task.commit} and is not empty"
            )
        paths.output.mkdir(parents=True, exist_ok=True)

    def _prepare(self, session: Session, task: TrainTask, paths: TaskPaths) -> _Prepared:
        """Check out the code, materialize the mounts, build the command line, and start (or
        join) the build of the environment its requirements.txt asks for."""
        paths.root.mkdir(parents=True, exist_ok=True)
        if task.attempt > 1 and paths.code.is_dir():
            # A re-run continues in the working directory it was lost in, output included.
            paths.note(f"attempt {task.attempt}, in the same working directory")
        else:
            self._checkout(task, paths)

        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env["PATH"] = _search_path(paths.bin)
        env.update(PYTHONUNBUFFERED="1", ANYLEARN_TASK_ID=task.id)
        env[MOUNT_ENV_VARS["output"]] = str(paths.output)

        mount_params: dict[str, str] = {}
        for kind in ("dataset", "model", "pretrain"):
            mount = task.mounts.get(kind) or {}
            ids = mount.get("ids") or []
            if not ids:
                continue
            value = ",".join(str(self._mount_path(session, kind, ref)) for ref in ids)
            env[MOUNT_ENV_VARS[kind]] = value
            if mount.get("hyperparam_name"):
                mount_params[mount["hyperparam_name"]] = value

        hyperparams = {k: substitute_placeholders(str(v), env) for k, v in task.hyperparams.items()}
        for name, value in mount_params.items():
            hyperparams.setdefault(name, value)
        words = format_hyperparams(hyperparams, task.hyperparams_prefix, task.hyperparams_delimiter)
        command = " ".join([substitute_placeholders(task.entrypoint, env), *words])
        spec = RunSpec(
            task_id=task.id,
            cwd=paths.code,
            command=command,
            env=env,
            log_path=paths.log,
            status_dir=paths.status,
            num_nodes=task.num_nodes,
            nproc_per_node=task.nproc_per_node,
        )
        python = session.get(Mirror, task.mirror_id).python
        requirements = paths.code / REQUIREMENTS_FILE
        if not requirements.is_file():
            return _Prepared(spec, python, None, None)
        try:
            key, build = self.environments.ensure(python, requirements, paths.log)
        except OSError as err:
            raise PrepareError(f"cannot read {REQUIREMENTS_FILE}: {err}") from err
        return _Prepared(spec, python, key, build)

    # cancel --------------------------------------------------------------------------------
    def cancel(self, task_id: str) -> None:
        """Cancel a task: a QUEUED one never starts; a RUNNING one has every rank ended."""
        with self.lock, self.sessions() as session:
            task = session.get(TrainTask, task_id)
            if task is None or TaskState(task.state).is_terminal:
                return
            if task.state == TaskState.RUNNING:
                self.executor.cancel(task.id)
            self._pending.pop(task.id, None)
            self._finish(session, task, TaskState.CANCELLED, None, "cancelled by the user")
            session.commit()
        self.wake()
