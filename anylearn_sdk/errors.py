"""Every exception the SDK raises on purpose.

The tree::

    AnylearnError
    ├── ConfigurationError (ValueError)        settings cannot be resolved or are invalid
    ├── InvalidArgumentError (ValueError)      a bad argument to an SDK call, caught locally
    │   └── RequiredLocalCommitError           the algorithm tree has uncommitted changes
    ├── LocalBackendError                      the embedded local backend did not start
    ├── ContentChangedError                    a file changed while it was read; run again
    ├── AnylearnTimeoutError (TimeoutError)    a wait or poll ran past its deadline
    ├── ResourceError                          a dataset or model version ended in ERROR
    ├── TaskStateError                         a task is not in a state that allows the call
    │   └── TaskFailedError                    a task ended FAILED or CANCELLED (its reason)
    ├── GitSyncError                           git failed to snapshot or push the algorithm
    └── HTTPError                              the server answered with an error status
        ├── BadRequestError (ValueError)       400 / 422
        ├── AuthenticationError                401: wrong password, missing or revoked token
        ├── PermissionDeniedError              403
        ├── NotFoundError (LookupError)        404; ``.resource_id`` names what was not found
        ├── ConflictError                      409
        └── ServerError                        5xx, or a connection that could not be made

Each message is one line that names the bad value and what is allowed. HTTP errors carry the
``response``, the server's machine-readable ``code`` (:class:`anylearn_sdk.states.ErrorCode`) and
its ``server_message``; :func:`anylearn_sdk.client.http.raise_for_status` is the one place that maps
a response to a class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests


class AnylearnError(Exception):
    """Root of every error the SDK raises on purpose."""


class ConfigurationError(AnylearnError, ValueError):
    """Settings cannot be resolved: no token, an invalid address, an unreadable config file."""


class InvalidArgumentError(AnylearnError, ValueError):
    """An argument to an SDK call is invalid; raised before anything is sent to a server."""


class RequiredLocalCommitError(InvalidArgumentError):
    """The algorithm's working tree has uncommitted changes and ``algorithm_force_update`` is off.

    Attributes:
        changed_files: relative paths git reports as changed or untracked.
    """

    def __init__(self, message: str, changed_files: list[str]):
        super().__init__(message)
        self.changed_files = changed_files


class ResumeRefusedError(InvalidArgumentError):
    """An interrupted ``quick_train`` call was not resumed: its code or inputs changed since
    it was made (the message names which, and how)."""


class LocalBackendError(AnylearnError):
    """The embedded local backend could not be started or reached."""


class ContentChangedError(AnylearnError):
    """A file of a dataset or model changed (size or content) while it was hashed or sent.

    Not a bad argument: the folder is fine, it was being written to. Run again once the
    writer is done; what was hashed and uploaded before is not redone.
    """


class AnylearnTimeoutError(AnylearnError, TimeoutError):
    """A wait or poll loop ran past its deadline (seconds)."""


class ResourceError(AnylearnError):
    """A dataset or model version ended in the ERROR state on the server."""


class TaskStateError(AnylearnError):
    """The task is not in a state that allows this (results of a task still running, say)."""


class TaskFailedError(TaskStateError):
    """The task ended FAILED or CANCELLED.

    Attributes:
        task_id: the task.
        state: its terminal :class:`~anylearn_sdk.states.TaskState`.
        reason: why, as the server recorded it (``exit code 1: ZeroDivisionError: ...``).
    """

    def __init__(self, message: str, *, task_id: str, state: Any, reason: str | None):
        super().__init__(message)
        self.task_id = task_id
        self.state = state
        self.reason = reason


class GitSyncError(AnylearnError):
    """git failed while snapshotting or pushing the algorithm."""


class HTTPError(AnylearnError):
    """The server answered with an error status.

    Attributes:
        response: the ``requests.Response`` (None when no response was received).
        code: the server's machine-readable error code, or None.
        server_message: the server's human message, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        response: requests.Response | None = None,
        code: str | None = None,
        server_message: str | None = None,
    ):
        super().__init__(message)
        self.response = response
        self.code = code
        self.server_message = server_message


class BadRequestError(HTTPError, ValueError):
    """400 or 422: the server refused the request's content."""


class AuthenticationError(HTTPError):
    """401: wrong username or password, or a missing, invalid or revoked token."""


class PermissionDeniedError(HTTPError):
    """403: the token is valid but may not do this (for instance, an admin-only call)."""


class NotFoundError(HTTPError, LookupError):
    """404: the resource does not exist or belongs to another user.

    Attributes:
        resource_id: the id that was asked for, when the caller knows it.
    """

    def __init__(self, message: str, *, resource_id: Any = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.resource_id = resource_id


class ConflictError(HTTPError):
    """409: the request conflicts with the resource's state (for instance a tus offset)."""


class ServerError(HTTPError):
    """5xx after retries, or the server could not be reached at all."""
