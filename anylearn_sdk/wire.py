"""The HTTP API's wire format: constants and every request and response body, defined once.

Both halves import this module: the server's routes declare these models (so the OpenAPI
document at ``/openapi.json`` describes them) and the SDK parses answers into them, so the
client and the server cannot disagree on a field. Pure pydantic, no I/O.

Records (what the server answers) ignore fields they do not know, so an older SDK keeps working
with a newer server. Times are ISO 8601 in UTC on the wire and aware ``datetime`` objects here.
Sizes are bytes, memory is MiB, durations are seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from anylearn_sdk.states import ResourceState, TaskState, UploadState

#: Every route is under this prefix.
API_PREFIX = "/api/v1"
#: The tus protocol version the upload endpoint speaks (tus 1.0, ``Tus-Resumable``).
TUS_VERSION = "1.0.0"
#: ``Upload-Checksum`` algorithms the server verifies (tus 1.0 §Checksum; sha1 is tuspy's).
TUS_CHECKSUM_ALGORITHMS = ("sha1", "sha256")
#: Keys of a resource request and a quota group's capacity: cores, MiB, whole GPUs.
RESOURCE_KEYS = ("cpu", "memory_mb", "gpu")
#: Names of users, projects, algorithms, datasets, models, mirrors and quota groups.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
#: Request header that makes a POST safe to repeat (the first answer is returned again).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Response headers of ``GET /train-tasks/{id}/logs``.
NEXT_OFFSET_HEADER = "X-Anylearn-Next-Offset"
TASK_STATE_HEADER = "X-Anylearn-Task-State"
#: Response header of ``POST /train-tasks`` with ``reuse="succeeded"`` that answered an
#: earlier task instead of creating one: that task's id.
REUSED_HEADER = "X-Anylearn-Reused"
#: Response header of a tus ``HEAD``: the upload's :class:`UploadState`.
UPLOAD_STATE_HEADER = "X-Anylearn-Upload-State"
#: Most bytes one ``GET /train-tasks/{id}/logs`` answers.
LOG_CHUNK_BYTES = 1024 * 1024
#: Largest byte offset a log read accepts (a file offset is a signed 64-bit number).
MAX_LOG_OFFSET = 2**63 - 1


def _utc(value: datetime) -> datetime:
    """A naive datetime is UTC (SQLite drops the zone); every datetime here is aware."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: A point in time, always timezone-aware and in UTC.
Timestamp = Annotated[datetime, AfterValidator(_utc)]


class Record(BaseModel):
    """Base of everything the server answers: immutable, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Body(BaseModel):
    """Base of request bodies."""

    model_config = ConfigDict(extra="ignore")


class ErrorDetail(Record):
    code: str
    message: str


class ErrorBody(Record):
    """Every error answer: ``{"error": {"code", "message"}}`` (codes: :class:`ErrorCode`)."""

    error: ErrorDetail


class Health(Record):
    status: Literal["ok"] = "ok"
    version: str
    server_id: str


# accounts ----------------------------------------------------------------------------------
class LoginBody(Body):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class UserRecord(Record):
    id: str
    username: str
    is_admin: bool = False
    created_at: Timestamp | None = None


class LoginResult(Record):
    token: str
    user: UserRecord


class NewUser(Body):
    username: str = Field(pattern=NAME_PATTERN)
    password: str = Field(min_length=8, max_length=1024)
    is_admin: bool = False


class NewToken(Body):
    """A token for the calling user; ``expires_in`` seconds from now, or never."""

    name: str = Field(default="", max_length=100)
    expires_in: int | None = Field(default=None, gt=0, le=100 * 365 * 86400)


class TokenRecord(Record):
    """A token, without its secret (only its sha256 is stored)."""

    id: int
    name: str = ""
    created_at: Timestamp
    expires_at: Timestamp | None = None


class NewTokenResult(TokenRecord):
    """A token just created: the only time its secret is shown."""

    token: str


class ProjectRecord(Record):
    id: str
    name: str
    is_default: bool = False
    created_at: Timestamp | None = None


class NewProject(Body):
    name: str = Field(pattern=NAME_PATTERN)


# algorithms --------------------------------------------------------------------------------
class AlgorithmRecord(Record):
    id: str
    name: str
    project_id: str
    created_at: Timestamp | None = None
    #: The smart-HTTP git URL path of its repository.
    git_path: str


class NewAlgorithm(Body):
    name: str = Field(pattern=NAME_PATTERN)
    project_id: str | None = None


class CommitRecord(Record):
    algorithm_id: str
    sha: str


# runtime -----------------------------------------------------------------------------------
class Amounts(BaseModel):
    """Resource amounts: CPUs (may be fractional), memory in MiB, whole GPUs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: float = Field(default=0, ge=0, le=1e6)
    memory_mb: int = Field(default=0, ge=0, le=2**40)
    gpu: int = Field(default=0, ge=0, le=1024)


class MirrorRecord(Record):
    """A runtime environment: the Python interpreter tasks run with."""

    id: str
    name: str
    python: str


class NewMirror(Body):
    name: str = Field(pattern=NAME_PATTERN)
    python: str = Field(max_length=4096)


class MirrorUpdate(Body):
    python: str = Field(max_length=4096)


class QuotaGroupRecord(Record):
    """A capacity pool, and what every user's tasks hold in it now: ``allocated`` (the sum of
    the RUNNING tasks' requests), ``running`` and ``queued`` (task counts)."""

    id: str
    name: str
    capacity: Amounts
    default_request: Amounts
    allocated: Amounts = Amounts()
    running: int = 0
    queued: int = 0


class NewQuotaGroup(Body):
    name: str = Field(pattern=NAME_PATTERN)
    capacity: Amounts
    default_request: Amounts = Amounts(cpu=1)


class QuotaGroupUpdate(Body):
    """New amounts for a quota group; amounts left out (in JSON, keys absent) stay."""

    capacity: Amounts | None = None
    default_request: Amounts | None = None


# datasets and models -----------------------------------------------------------------------
class ResourceRecord(Record):
    """A dataset or model version. ``missing`` (registration only): the sha256 digests of the
    objects still to upload; ``manifest`` (``?manifest=true`` only): its entries."""

    id: str
    kind: Literal["dataset", "model"]
    name: str
    project_id: str
    checksum: str
    state: ResourceState
    file_count: int = 0
    total_bytes: int = 0
    error: str | None = None
    created_at: Timestamp | None = None
    missing: list[str] | None = None
    manifest: list[dict[str, Any]] | None = None


class NewResource(Body):
    """A version to register: its whole ``manifest``, or a delta against a version the user
    already registered (``base_checksum`` + ``changes`` + ``removed`` paths)."""

    name: str = Field(pattern=NAME_PATTERN)
    checksum: str = Field(pattern=SHA256_PATTERN)
    manifest: list[dict[str, Any]] | None = None
    base_checksum: str | None = Field(default=None, pattern=SHA256_PATTERN)
    changes: list[dict[str, Any]] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    project_id: str | None = None


class DigestList(Body):
    digests: list[str] = Field(max_length=1_000_000)


class MissingObjects(Record):
    missing: list[str]


class UploadRecord(Record):
    """A tus upload of a dataset or model (``GET /uploads?resource_id=``; not part of tus)."""

    id: str
    state: UploadState
    concat: Literal["partial", "final"] | None = None
    kind: str | None = None
    length: int
    offset: int
    received_bytes: int = 0
    error: str | None = None
    expires_at: Timestamp | None = None


# train tasks -------------------------------------------------------------------------------
class Mount(BaseModel):
    """Ids of one kind of input, and the hyperparameter that receives their path."""

    ids: list[str] = Field(default_factory=list, max_length=100)
    hyperparam_name: str | None = Field(default=None, max_length=100)


class Mounts(BaseModel):
    dataset: Mount = Mount()
    model: Mount = Mount()
    pretrain: Mount = Mount()


HyperValue = str | int | float | bool | None


class NewTask(Body):
    name: str | None = Field(default=None, max_length=200)
    description: str = Field(default="", max_length=10_000)
    project_id: str | None = None
    algorithm_id: str
    commit: str = Field(max_length=64)
    entrypoint: str = Field(min_length=1, max_length=10_000)
    hyperparams: dict[str, HyperValue] = Field(default_factory=dict)
    hyperparams_prefix: str = Field(default="--", max_length=16)
    hyperparams_delimiter: str = Field(default=" ", max_length=16)
    mounts: Mounts = Mounts()
    output: str = Field(default="output", max_length=1000)
    mirror_id: str
    quota_group_id: str
    request: Amounts | None = None
    num_nodes: int = Field(default=1, ge=1, le=64)
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    #: "run" (create a task) or "succeeded": answer an earlier SUCCEEDED task of the same
    #: commit, inputs (by checksum), entrypoint, hyperparameters, mirror and environment key
    #: instead (with the :data:`REUSED_HEADER`), if there is one.
    reuse: Literal["run", "succeeded"] = "run"


class TaskInput(Record):
    """One mounted input; datasets and models also carry what their version holds."""

    kind: Literal["dataset", "model", "pretrain"]
    id: str
    name: str | None = None
    checksum: str | None = None
    file_count: int | None = None
    total_bytes: int | None = None


class TaskRuntime(Record):
    """How the current attempt runs: its environment's key (None without a requirements.txt),
    the interpreter, the GPU indices (local executor), the variables every rank gets, and on
    the Ray executor the id of the Ray node of each node rank."""

    environment: str | None = None
    python: str | None = None
    gpus: list[int] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    nodes: list[str] = Field(default_factory=list)


class TaskRecord(Record):
    """A train task's whole record (``GET /train-tasks/{id}`` adds ``inputs``).

    ``error`` is why it FAILED or was CANCELLED, in words a person can act on: the command that
    was not found, or the last line of the Python traceback in its log.
    """

    id: str
    name: str
    description: str = ""
    state: TaskState
    project_id: str
    algorithm_id: str
    commit: str
    entrypoint: str
    hyperparams: dict[str, HyperValue] = Field(default_factory=dict)
    hyperparams_prefix: str = "--"
    hyperparams_delimiter: str = " "
    mounts: Mounts = Mounts()
    output: str = "output"
    mirror_id: str
    quota_group_id: str
    request: Amounts = Amounts()
    num_nodes: int = 1
    nproc_per_node: int = 1
    command: str | None = None
    exit_code: int | None = None
    attempt: int = 1
    runtime: TaskRuntime = TaskRuntime()
    error: str | None = None
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    inputs: list[TaskInput] = Field(default_factory=list)


class TaskSummary(Record):
    """What a live table shows of a task (``GET /train-tasks?view=summary``): ``quota_group``
    is the group's name, ``last_line`` the log's last non-empty line."""

    id: str
    name: str
    state: TaskState
    quota_group: str
    attempt: int = 1
    exit_code: int | None = None
    error: str | None = None
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    last_line: str = ""


class NewModelFromResults(Body):
    name: str | None = Field(default=None, max_length=200)
    project_id: str | None = None


class ModelFromResults(ResourceRecord):
    """A model registered from a task's results; ``skipped``: links and special files left out."""

    skipped: list[str] = Field(default_factory=list)
    task_id: str


# experiment records ------------------------------------------------------------------------
class CodeRecord(Record):
    """Which code ran: the algorithm, the commit and its message. ``snapshot``: the commit is
    a forced snapshot of a working tree with uncommitted changes (``base_commit`` is the commit
    it was made over, ``changed_files`` the paths that differ from it) or of a folder without
    git (no base)."""

    algorithm_id: str
    algorithm: str
    commit: str
    message: str = ""
    snapshot: bool = False
    base_commit: str | None = None
    changed_files: list[str] = Field(default_factory=list)


class DataRecord(Record):
    """Which data it read: every mounted dataset and model version (checksum, files, bytes)
    and the tasks whose results it mounted (``pretrain``)."""

    inputs: list[TaskInput] = Field(default_factory=list)
    pretrain: list[str] = Field(default_factory=list)


class ParametersRecord(Record):
    """How it was called: the hyperparameters as given, the entrypoint, the final command line
    (None until an attempt started), and what the code itself logged with ``log_params`` and
    ``set_tags`` (text values)."""

    hyperparams: dict[str, HyperValue] = Field(default_factory=dict)
    entrypoint: str
    command: str | None = None
    logged: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


class EnvironmentRecord(Record):
    """Where it ran: the mirror, the interpreter and its version, the environment's key (None
    without a requirements.txt) and its resolved packages (``name==version``, captured once per
    environment), the GPU indices, and ``num_nodes`` × ``nproc_per_node`` processes."""

    mirror_id: str
    mirror: str | None = None
    python: str | None = None
    python_version: str | None = None
    environment: str | None = None
    packages: list[str] = Field(default_factory=list)
    gpus: list[int] = Field(default_factory=list)
    nodes: list[str] = Field(default_factory=list)
    num_nodes: int = 1
    nproc_per_node: int = 1


class RunRecord(Record):
    """How it went: the quota group (name) and the request per node, the times, attempts, exit
    code, the failure reason, and the last Python traceback in the log (its text, and its
    exception line in ``exception``)."""

    state: TaskState
    quota_group: str | None = None
    request: Amounts = Amounts()
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    attempts: int = 1
    exit_code: int | None = None
    error: str | None = None
    exception: str | None = None
    traceback: str | None = None


class MetricSeries(Record):
    """One metric: its points (``steps``, ``values``, ``timestamps`` in seconds since the
    epoch, in step order) and their ``last``, ``min`` and ``max``. ``source``: ``log_metrics``
    or ``tensorboard`` (scalars from event files under the output folder)."""

    key: str
    source: Literal["log_metrics", "tensorboard"] = "log_metrics"
    steps: list[int] = Field(default_factory=list)
    values: list[float] = Field(default_factory=list)
    timestamps: list[float] = Field(default_factory=list)
    last: float | None = None
    min: float | None = None
    max: float | None = None


class OutputFile(Record):
    """A file of the output folder: its path in it, size in bytes and sha256."""

    path: str
    bytes: int
    sha256: str


class ResultsRecord(Record):
    """What it produced: the metric series by key, and the output files (at most 10,000;
    ``outputs_truncated`` says there were more)."""

    metrics: dict[str, MetricSeries] = Field(default_factory=dict)
    outputs: list[OutputFile] = Field(default_factory=list)
    outputs_truncated: bool = False


class ExperimentRecord(Record):
    """A task's experiment record (``GET /train-tasks/{id}/record``): code, data, parameters,
    environment, run and results. It is built when asked, so while the task runs its metric
    series and outputs grow from one read to the next."""

    task_id: str
    name: str
    description: str = ""
    backend: str = ""
    code: CodeRecord
    data: DataRecord
    parameters: ParametersRecord
    environment: EnvironmentRecord
    run: RunRecord
    results: ResultsRecord
