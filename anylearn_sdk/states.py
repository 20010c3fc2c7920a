"""State enums shared by the SDK and the reference backend.

One module both halves import, so the client and the server can never disagree on a state's
spelling. Terminal states are a set the code asks about (``state.is_terminal``), as in Ray's
``JobStatus.is_terminal`` and huggingface_hub's ``JobStage``.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    """A train task: ``CREATED → QUEUED → RUNNING → SUCCEEDED | FAILED | CANCELLED``."""

    CREATED = "CREATED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED: the task will never change again."""
        return self in TERMINAL_TASK_STATES


TERMINAL_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class ResourceState(StrEnum):
    """A dataset or model version: ``CREATED → UPLOADING → READY``, or ERROR, or DELETED.

    A version is READY only once the server has verified the sha256 of every file it holds.
    """

    CREATED = "CREATED"
    UPLOADING = "UPLOADING"
    READY = "READY"
    ERROR = "ERROR"
    DELETED = "DELETED"

    @property
    def is_terminal(self) -> bool:
        """True for READY, ERROR and DELETED: polling can stop."""
        return self in (ResourceState.READY, ResourceState.ERROR, ResourceState.DELETED)


class UploadState(StrEnum):
    """A tus upload on the server.

    RECEIVING (bytes still arriving), COMPLETE (a partial upload with all its bytes, waiting for
    the final upload that concatenates it), CONSUMED (a partial joined into a final), VERIFYING
    (on a worker thread), STORED (every object verified and in the store) or FAILED.
    """

    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    CONSUMED = "CONSUMED"
    VERIFYING = "VERIFYING"
    STORED = "STORED"
    FAILED = "FAILED"


class ErrorCode(StrEnum):
    """Machine-readable ``error.code`` of the HTTP API (``{"error": {"code", "message"}}``)."""

    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    QUOTA_EXCEEDED = "quota_exceeded"
    INTERNAL = "internal"
