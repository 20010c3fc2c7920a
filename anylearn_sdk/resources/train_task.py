"""TrainTask: follow, wait for, cancel and collect a remote training task."""

from __future__ import annotations

import codecs
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anylearn_sdk.errors import AnylearnTimeoutError, InvalidArgumentError, ServerError
from anylearn_sdk.resources.dataset import Model
from anylearn_sdk.session import SdkContext, get_context
from anylearn_sdk.states import TaskState

DOWNLOAD_BLOCK_BYTES = 1024 * 1024
#: Seconds :meth:`TrainTask.stream_logs` keeps trying to reach a server that went away.
DEFAULT_RECONNECT_TIMEOUT = 600.0


def _check_interval(name: str, value: float | None, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}")


class TrainTask:
    """A train task on the backend.

    ``TrainTask(id=..., load_detail=True)`` loads any of the current user's tasks. Attributes
    mirror the server's record: ``id``, ``name``, ``state`` (:class:`TaskState`), ``commit``,
    ``entrypoint``, ``hyperparams``, ``command`` (the exact command line once started),
    ``exit_code``, ``error``, ``attempt`` (1, plus one per re-run after the task's processes
    were lost), ``created_at``/``started_at``/``finished_at`` (ISO 8601 strings).

    Raises:
        NotFoundError: (with ``load_detail=True``) no such task for this user.
    """

    def __init__(
        self,
        id: str,  # noqa: A002 - Anylearn's keyword
        load_detail: bool = False,
        *,
        context: SdkContext | None = None,
        data: dict[str, Any] | None = None,
    ):
        self.id = id
        self._context = context
        self.data: dict[str, Any] = {"id": id}
        if data is not None:
            self._apply(data)
        elif load_detail:
            self.refresh()

    def __repr__(self) -> str:
        return f"TrainTask(id={self.id!r}, state={self.data.get('state')!r})"

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("data", {})
        if name in data:
            return data[name]
        raise AttributeError(name)

    @property
    def context(self) -> SdkContext:
        if self._context is None:
            self._context = get_context()
        return self._context

    @property
    def state(self) -> TaskState:
        return TaskState(self.data["state"]) if "state" in self.data else TaskState.CREATED

    def _apply(self, data: dict[str, Any]) -> None:
        self.data = dict(data)
        ctx = self._context
        if ctx is not None and "state" in data:
            ctx.store.update_task_state(ctx.server_id, self.id, data["state"])

    def refresh(self) -> TrainTask:
        """Reload the task from the server (and update its row in the local store)."""
        data = self.context.api.get_json(f"/train-tasks/{self.id}", resource_id=self.id)
        self._apply(data)
        return self

    def wait(self, timeout: float | None = None, poll_interval: float = 2.0) -> TaskState:
        """Block until the task reaches a terminal state.

        Args:
            timeout: seconds to wait at most; None waits forever.
            poll_interval: seconds between refreshes.

        Returns:
            The terminal state.

        Raises:
            InvalidArgumentError: ``timeout`` or ``poll_interval`` is not a positive number.
            AnylearnTimeoutError: the deadline passed first.
        """
        _check_interval("timeout", timeout, allow_none=True)
        _check_interval("poll_interval", poll_interval, allow_none=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.refresh().state
            if state.is_terminal:
                return state
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AnylearnTimeoutError(
                        f"task {self.id} still {state.value} after {timeout} s"
                    )
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
            int(response.headers["X-Anylearn-Next-Offset"]),
            TaskState(response.headers["X-Anylearn-Task-State"]),
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
        down_since: float | None = None
        while True:
            try:
                data, offset, state = self._log_chunk(offset)
            except ServerError as err:
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    if on_disconnect is not None:
                        on_disconnect(err, offset)
                if reconnect_timeout is not None and now - down_since >= reconnect_timeout:
                    raise
                time.sleep(poll_interval)
                continue
            down_since = None
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

    def cancel(self) -> TaskState:
        """Cancel the task (every process of it ends); returns the state after the call."""
        data = self.context.api.post_json(f"/train-tasks/{self.id}/cancel", resource_id=self.id)
        self._apply(data)
        return self.state

    def register_model(self, name: str | None = None, project_id: str | None = None) -> Model:
        """Register this task's results (its output folder) as a model version on the server.

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
        data = self.context.api.post_json(
            f"/train-tasks/{self.id}/register-model",
            {"name": name, "project_id": project_id},
            resource_id=self.id,
        )
        return Model.from_json(data)

    def download_results(self, dest: str | Path) -> Path:
        """Download the task's output folder into ``dest`` (created if needed).

        Members are extracted with tarfile's ``data`` filter (PEP 706), which refuses absolute
        paths, ``..``, links out of ``dest`` and special files.

        Returns:
            ``dest`` as a Path.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        response = self.context.api.request(
            "GET", f"/train-tasks/{self.id}/results", stream=True, resource_id=self.id
        )
        with tempfile.TemporaryFile() as buf:
            for block in response.iter_content(DOWNLOAD_BLOCK_BYTES):
                buf.write(block)
            buf.seek(0)
            with tarfile.open(fileobj=buf, mode="r:") as tar:
                tar.extractall(dest, filter="data")
        return dest
