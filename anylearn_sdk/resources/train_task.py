"""TrainTask: follow, wait for, cancel, collect and remove a remote training task; list tasks.

Every call that follows a task over time (:meth:`TrainTask.wait`,
:meth:`TrainTask.stream_logs`, :func:`follow_train_tasks`) waits through outages of the
backend, up to ``reconnect_timeout`` seconds, and the client of the local backend re-reads its
address before each retry, so following survives ``anylearn server stop`` / ``start``.
"""

from __future__ import annotations

import codecs
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

from anylearn_sdk.errors import (
    AnylearnTimeoutError,
    InvalidArgumentError,
    ServerError,
    TaskFailedError,
    TaskStateError,
)
from anylearn_sdk.resources.dataset import Model
from anylearn_sdk.resources.ids import resolve_id
from anylearn_sdk.session import SdkContext, get_context
from anylearn_sdk.states import TaskState
from anylearn_sdk.wire import (
    NEXT_OFFSET_HEADER,
    TASK_STATE_HEADER,
    Amounts,
    ExperimentRecord,
    MetricSeries,
    NewModelFromResults,
    TaskInput,
    TaskRecord,
    TaskRuntime,
    TaskSummary,
)

DOWNLOAD_BLOCK_BYTES = 1024 * 1024
#: MiB of output files :meth:`TrainTask.export_mlflow` uploads as artifacts at most.
DEFAULT_MAX_ARTIFACT_MB = 1024.0
#: Seconds following calls keep trying to reach a backend that went away.
DEFAULT_RECONNECT_TIMEOUT = 600.0


def _check_interval(name: str, value: float | None, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}")


class _Outage:
    """Tracks one outage of the backend for a following loop: report it once, give up after
    ``timeout`` seconds (None: never)."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.since: float | None = None

    def failed(self, err: ServerError) -> bool:
        """Note a failed call; True if it starts an outage. Re-raises ``err`` once the outage
        has lasted ``timeout`` seconds."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            return True
        if self.timeout is not None and now - self.since >= self.timeout:
            raise err
        return False

    def over(self) -> None:
        self.since = None


class TrainTask:
    """A train task on the backend.

    ``TrainTask(id, load_detail=True)`` loads any of the current user's tasks; without
    ``load_detail`` the record loads on first use. The attributes are the server's record
    (:class:`~anylearn_sdk.wire.TaskRecord`, also whole as :attr:`info`): ``name``,
    ``state``, ``commit``, ``entrypoint``, ``hyperparams``, ``command`` (the exact command line
    once started), ``exit_code``, ``error`` (why it failed, in words a person can act on),
    ``attempt`` (1, plus one per re-run after its processes were lost), ``inputs``,
    ``created_at``/``started_at``/``finished_at`` (aware datetimes, UTC).

    Raises:
        NotFoundError: (on loading) no such task for this user.
    """

    def __init__(
        self,
        id: str,  # noqa: A002 - Anylearn's keyword
        load_detail: bool = False,
        *,
        context: SdkContext | None = None,
        record: TaskRecord | None = None,
    ):
        self.id = id
        self._context = context
        self._record: TaskRecord | None = None
        if record is not None:
            self._apply(record)
        elif load_detail:
            self.refresh()

    def __repr__(self) -> str:
        state = self._record.state.value if self._record is not None else "?"
        return f"TrainTask(id={self.id!r}, state={state!r})"

    @property
    def context(self) -> SdkContext:
        if self._context is None:
            self._context = get_context()
        return self._context

    @property
    def info(self) -> TaskRecord:
        """The server's whole record of the task, as last loaded (loaded now if never)."""
        return self._record if self._record is not None else self._load()

    # typed attributes of the record -----------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def state(self) -> TaskState:
        return self.info.state

    @property
    def commit(self) -> str:
        return self.info.commit

    @property
    def entrypoint(self) -> str:
        return self.info.entrypoint

    @property
    def hyperparams(self) -> dict:
        return dict(self.info.hyperparams)

    @property
    def command(self) -> str | None:
        return self.info.command

    @property
    def exit_code(self) -> int | None:
        return self.info.exit_code

    @property
    def error(self) -> str | None:
        return self.info.error

    @property
    def attempt(self) -> int:
        return self.info.attempt

    @property
    def inputs(self) -> list[TaskInput]:
        return list(self.info.inputs)

    @property
    def runtime(self) -> TaskRuntime:
        """How the current attempt runs: environment key, python, GPU indices, variables."""
        return self.info.runtime

    @property
    def request(self) -> Amounts:
        return self.info.request

    @property
    def quota_group_id(self) -> str:
        return self.info.quota_group_id

    @property
    def algorithm_id(self) -> str:
        return self.info.algorithm_id

    @property
    def project_id(self) -> str:
        return self.info.project_id

    @property
    def output(self) -> str:
        return self.info.output

    @property
    def created_at(self) -> datetime:
        return self.info.created_at

    @property
    def started_at(self) -> datetime | None:
        return self.info.started_at

    @property
    def finished_at(self) -> datetime | None:
        return self.info.finished_at

    # calls ------------------------------------------------------------------------------
    def _apply(self, record: TaskRecord) -> TaskRecord:
        self._record = record
        ctx = self._context
        if ctx is not None:
            ctx.store.update_task_state(ctx.server_id, self.id, record.state.value)
        return record

    def _load(self) -> TaskRecord:
        path = f"/train-tasks/{self.id}"
        return self._apply(self.context.api.call("GET", path, TaskRecord, resource_id=self.id))

    def refresh(self) -> TrainTask:
        """Reload the task from the server (and update its row in the local store)."""
        self._load()
        return self

    def failure(self, hint: str = "") -> TaskFailedError | None:
        """The error describing how the task ended, if it ended FAILED or CANCELLED (its
        message ends with ``hint``, what the caller may do instead, when given)."""
        record = self.info
        if record.state not in (TaskState.FAILED, TaskState.CANCELLED):
            return None
        reason = record.error or "no reason recorded"
        return TaskFailedError(
            f"task {self.id} {record.state.value}: {reason}" + (f"; {hint}" if hint else ""),
            task_id=self.id,
            state=record.state,
            reason=record.error,
        )

    def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        *,
        raise_on_failure: bool = False,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
    ) -> TaskState:
        """Block until the task reaches a terminal state.

        Args:
            timeout: seconds to wait at most; None waits forever.
            poll_interval: seconds between refreshes.
            raise_on_failure: raise :class:`TaskFailedError` (with the server's reason) if
                the task ends FAILED or CANCELLED, instead of returning that state.
            reconnect_timeout: seconds to keep trying while the backend cannot be reached
                (a restart, a network drop); None: for ever.

        Returns:
            The terminal state.

        Raises:
            InvalidArgumentError: ``timeout`` or ``poll_interval`` is not a positive number.
            AnylearnTimeoutError: the deadline passed first.
            TaskFailedError: with ``raise_on_failure``, the task FAILED or was CANCELLED.
            ServerError: the backend stayed unreachable for ``reconnect_timeout`` seconds.
        """
        _check_interval("timeout", timeout, allow_none=True)
        _check_interval("poll_interval", poll_interval, allow_none=False)
        _check_interval("reconnect_timeout", reconnect_timeout, allow_none=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage(reconnect_timeout)
        while True:
            try:
                state = self.refresh().state
                outage.over()
            except ServerError as err:
                outage.failed(err)
                state = None
            if state is not None and state.is_terminal:
                failure = self.failure() if raise_on_failure else None
                if failure is not None:
                    raise failure
                return state
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    shown = state.value if state is not None else "unreachable"
                    raise AnylearnTimeoutError(f"task {self.id} still {shown} after {timeout} s")
                time.sleep(min(poll_interval, remaining))
            else:
                time.sleep(poll_interval)

    def logs(self, offset: int = 0) -> tuple[str, int]:
        """Log text from byte ``offset``; returns ``(text, next_offset)`` (up to 1 MiB a call)."""
        data, next_offset, _state = self._log_chunk(offset)
        return data.decode("utf-8", errors="replace"), next_offset

    def _log_chunk(self, offset: int) -> tuple[bytes, int, TaskState]:
        response = self.context.api.request(
            "GET", f"/train-tasks/{self.id}/logs", params={"offset": offset}, resource_id=self.id
        )
        return (
            response.content,
            int(response.headers[NEXT_OFFSET_HEADER]),
            TaskState(response.headers[TASK_STATE_HEADER]),
        )

    def stream_logs(
        self,
        poll_interval: float = 1.0,
        offset: int = 0,
        *,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        on_disconnect: Callable[[ServerError, int], None] | None = None,
    ) -> Iterator[str]:
        """Yield log text as it is written, until the task is terminal and the log is read.

        Decoding is incremental, so a UTF-8 character split across chunks arrives whole. The
        log is read by byte offset, so when the server cannot be reached (a network drop, a
        restart) the stream waits and goes on from the last byte it yielded: every line
        arrives exactly once, as ``kubectl logs -f`` and ``sky logs`` readers expect.

        Args:
            poll_interval: seconds between reads while nothing new was written.
            offset: byte to start from.
            reconnect_timeout: seconds to keep trying while the server is unreachable or
                failing (None: forever).
            on_disconnect: called with the error and the offset once per outage.

        Raises:
            ServerError: the server stayed unreachable for ``reconnect_timeout`` seconds.
        """
        _check_interval("poll_interval", poll_interval, allow_none=False)
        _check_interval("reconnect_timeout", reconnect_timeout, allow_none=True)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        outage = _Outage(reconnect_timeout)
        while True:
            try:
                data, offset, state = self._log_chunk(offset)
            except ServerError as err:
                if outage.failed(err) and on_disconnect is not None:
                    on_disconnect(err, offset)
                time.sleep(poll_interval)
                continue
            outage.over()
            if data:
                text = decoder.decode(data)
                if text:
                    yield text
                continue
            if state.is_terminal:
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                self.refresh()
                return
            time.sleep(poll_interval)

    def record(self) -> ExperimentRecord:
        """The task's experiment record, read now: code (commit, message, whether it is a
        snapshot of uncommitted changes and which files they touched), data (each input's
        checksum, files, bytes), parameters, environment (mirror, Python, packages), run
        (quota group, times, attempts, exit code, failure and last traceback) and results
        (metric series with their summaries, output files with sha256). While the task
        runs, each call sees its series grown. See ``docs/experiments.md``.

        Raises:
            NotFoundError: no such task for this user.
        """
        path = f"/train-tasks/{self.id}/record"
        return self.context.api.call("GET", path, ExperimentRecord, resource_id=self.id)

    def metrics(self, keys: Iterable[str] | None = None) -> dict[str, MetricSeries]:
        """The task's metric series by key (all, or only ``keys``), as far as they go now:
        what it logged with :func:`~anylearn_sdk.log_metrics` and the TensorBoard scalars
        under its output. Cheaper than :meth:`record` for following a curve."""
        params = [("key", k) for k in keys or ()]
        path = f"/train-tasks/{self.id}/metrics"
        return self.context.api.call(
            "GET", path, dict[str, MetricSeries], params=params, resource_id=self.id
        )

    def export_mlflow(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        max_artifact_mb: float = DEFAULT_MAX_ARTIFACT_MB,
        allow_dirty: bool = False,
    ) -> str:
        """Export the finished task to MLflow as one run; returns the run's id.

        The run gets the hyperparameters and logged parameters, every metric point with its
        step and timestamp, tags (``anylearn.task_id``, commit, snapshot flag, input
        checksums, backend) and the output files as artifacts. Exporting the same task again
        updates the same run (found by its ``anylearn.task_id`` tag). ``tracking_uri``
        defaults to MLflow's own (``MLFLOW_TRACKING_URI``), ``experiment`` to MLflow's default
        experiment. Needs the ``mlflow`` extra (``pip install 'anylearn-sdk[mlflow]'``),
        imported only here.

        Raises:
            TaskStateError: the task has not finished.
            InvalidArgumentError: its code is a snapshot of uncommitted changes (pass
                ``allow_dirty=True`` to export it anyway), its output files total more than
                ``max_artifact_mb`` MiB, or mlflow is not installed.
        """
        from anylearn_sdk.resources.mlflow_export import export_task

        return export_task(
            self,
            tracking_uri=tracking_uri,
            experiment=experiment,
            max_artifact_mb=max_artifact_mb,
            allow_dirty=allow_dirty,
        )

    def cancel(self) -> TaskState:
        """Cancel the task (every rank gets SIGTERM, then SIGKILL); returns its new state."""
        path = f"/train-tasks/{self.id}/cancel"
        self._apply(self.context.api.call("POST", path, TaskRecord, resource_id=self.id))
        return self.state

    def delete(self) -> None:
        """Remove the finished task from the server: its record, log and results (a model
        registered from them stays), and its row in the local store.

        Raises:
            ConflictError: it is queued or running (cancel it first), or a live task mounts
                its results.
        """
        ctx = self.context
        ctx.api.request("DELETE", f"/train-tasks/{self.id}", resource_id=self.id)
        ctx.store.forget_task(ctx.server_id, self.id)

    def register_model(self, name: str | None = None, project_id: str | None = None) -> Model:
        """Register this SUCCEEDED task's results as a model, mountable with ``model_id``.

        The server copies every regular file into its object store (symbolic links are
        skipped), so the model can be mounted with ``quick_train(model_id=...)`` however long
        the task's folder lives. Content-addressed: equal results give the same model.

        Args:
            name: the model's name (default: the task's name).
            project_id: its project (default: the task's project).

        Returns:
            The READY :class:`Model`.

        Raises:
            ConflictError: the task is not SUCCEEDED, or its results are gone.
        """
        body = NewModelFromResults(name=name, project_id=project_id)
        path = f"/train-tasks/{self.id}/register-model"
        return self.context.api.call("POST", path, Model, body, resource_id=self.id)

    def download_results(self, dest: str | Path, *, allow_partial: bool = False) -> Path:
        """Download the task's output folder into ``dest`` (created if needed).

        Members are extracted with tarfile's ``data`` filter (PEP 706), which refuses absolute
        paths, ``..``, links out of ``dest`` and special files.

        Args:
            dest: a folder (made if missing).
            allow_partial: also download what a FAILED, CANCELLED or still running task has
                written so far (checkpoints); by default only a SUCCEEDED task's results.

        Returns:
            ``dest`` as a Path.

        Raises:
            InvalidArgumentError: ``dest`` exists and is not a folder (nothing is written).
            TaskFailedError: the task FAILED or was CANCELLED (its reason), without
                ``allow_partial``.
            TaskStateError: the task has not ended yet, without ``allow_partial``.
            NotFoundError: the task left no output folder.
        """
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise InvalidArgumentError(f"dest {str(dest)!r} exists and is not a folder")
        if not allow_partial:
            state = self.refresh().state
            failure = self.failure("pass allow_partial=True (--partial) for what it left")
            if failure is not None:
                raise failure
            if not state.is_terminal:
                raise TaskStateError(
                    f"task {self.id} is {state.value}; wait for it, or pass allow_partial=True "
                    "(--partial) for what it has written so far"
                )
        response = self.context.api.request(
            "GET", f"/train-tasks/{self.id}/results", stream=True, resource_id=self.id
        )
        with tempfile.TemporaryFile() as buf:
            for block in response.iter_content(DOWNLOAD_BLOCK_BYTES):
                buf.write(block)
            buf.seek(0)
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=buf, mode="r:") as tar:
                tar.extractall(dest, filter="data")
        return dest


def _states(state: str | TaskState | Iterable[str | TaskState] | None) -> str | None:
    if state is None:
        return None
    values = [state] if isinstance(state, str) else list(state)
    try:
        return ",".join(TaskState(v).value for v in values)
    except ValueError as err:
        raise InvalidArgumentError(
            f"state {state!r}: use {', '.join(s.value for s in TaskState)}"
        ) from err


def list_train_tasks(
    *,
    state: str | TaskState | Iterable[str | TaskState] | None = None,
    created_from: datetime | None = None,
    limit: int = 100,
    context: SdkContext | None = None,
) -> list[TaskSummary]:
    """Your newest ``limit`` tasks, oldest first, as one cheap request.

    Args:
        state: only tasks in this state (or these states).
        created_from: only tasks created then or later.
        limit: how many of the newest (1 to 10,000).

    Returns:
        :class:`~anylearn_sdk.wire.TaskSummary` objects: id, name, state, quota group name,
        attempt, exit code, error, times, and the last line of the log.
        ``TrainTask(id, load_detail=True)`` loads a whole record.

    Raises:
        InvalidArgumentError: an unknown state or a limit out of range.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise InvalidArgumentError(f"limit must be 1..10000, got {limit!r}")
    params: dict[str, str | int] = {"view": "summary", "limit": limit}
    states = _states(state)
    if states:
        params["state"] = states
    if created_from is not None:
        params["created_from"] = created_from.isoformat()
    ctx = context or get_context()
    return ctx.api.call("GET", "/train-tasks", list[TaskSummary], params=params)


def follow_train_tasks(
    tasks: list[TaskSummary],
    *,
    interval: float = 2.0,
    reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
    on_disconnect: Callable[[ServerError], None] | None = None,
    context: SdkContext | None = None,
) -> Iterator[list[TaskSummary]]:
    """Yield ``tasks`` refreshed every ``interval`` seconds (one request each) until every
    one of them is terminal; outages of the backend are waited through.

    Raises:
        ServerError: the backend stayed unreachable for ``reconnect_timeout`` seconds.
    """
    _check_interval("interval", interval, allow_none=False)
    ctx = context or get_context()
    by_id = {t.id: t for t in tasks}
    unfinished = [t for t in tasks if not t.state.is_terminal]
    since = min((t.created_at for t in unfinished), default=None)
    outage = _Outage(reconnect_timeout)
    while any(not by_id[t.id].state.is_terminal for t in unfinished):
        time.sleep(interval)
        try:
            fresh = list_train_tasks(created_from=since, limit=10_000, context=ctx)
        except ServerError as err:
            if outage.failed(err) and on_disconnect is not None:
                on_disconnect(err)
            continue
        outage.over()
        for row in fresh:
            if row.id in by_id:
                by_id[row.id] = row
        yield [by_id[t.id] for t in tasks]


def resolve_task_id(ref: str, *, context: SdkContext | None = None) -> str:
    """The id of your task that ``ref`` names: its id, or a unique prefix of it (``task-e98c``
    or ``e98c``), as docker and git take ids.

    Raises:
        NotFoundError: no task matches.
        InvalidArgumentError: several do (they are named).
    """
    ctx = context or get_context()

    def matching(prefix: str) -> list[str]:
        params = {"view": "summary", "id_prefix": prefix, "limit": 10}
        return [t.id for t in ctx.api.call("GET", "/train-tasks", list[TaskSummary], params=params)]

    return resolve_id("task", ref, matching)


def newest_train_task(*, context: SdkContext | None = None) -> TrainTask:
    """Your most recently created task.

    Raises:
        TaskStateError: you have no task yet.
    """
    ctx = context or get_context()
    newest = list_train_tasks(limit=1, context=ctx)
    if not newest:
        raise TaskStateError("you have no train task yet")
    return TrainTask(newest[0].id, context=ctx)
