"""``quick_train``: two local folders to a running remote training task, in one call.

Compatible in spirit with the Anylearn SDK's ``quick_train`` (same parameter names, same
return value), with its flaws fixed: every argument is checked, and every name and id resolved,
before anything is created on the server or changed locally; code is pinned to an exact
commit; data is deduplicated by content and only what the server lacks is uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from anylearn_sdk import gitsync
from anylearn_sdk.client.http import ApiClient, make_body
from anylearn_sdk.config import stored_token
from anylearn_sdk.content.archive import archive_manifest
from anylearn_sdk.content.manifest import Manifest
from anylearn_sdk.errors import (
    AnylearnError,
    BadRequestError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceError,
    ResumeRefusedError,
)
from anylearn_sdk.interrupts import INTERRUPTED_MESSAGE, stoppable_pool
from anylearn_sdk.progress import ProgressCallback, resolve_progress
from anylearn_sdk.protocol import check_relative_path
from anylearn_sdk.resources.algorithm import (
    Algorithm,
    algorithm_name_for,
    find_algorithm,
    has_commit,
    sync_algorithm,
)
from anylearn_sdk.resources.dataset import Dataset, await_ready, get_ready, start_sync
from anylearn_sdk.resources.project import Project, ensure_project, find_project
from anylearn_sdk.resources.runtime import check_amounts, resolve_mirror, resolve_quota_group
from anylearn_sdk.resources.train_task import TrainTask
from anylearn_sdk.resources.upload import Preuploads, build_and_preupload, preuploads_for
from anylearn_sdk.session import SdkContext, get_context, server_id_of
from anylearn_sdk.states import TaskState
from anylearn_sdk.wire import (
    IDEMPOTENCY_HEADER,
    REUSED_HEADER,
    AlgorithmRecord,
    HyperValue,
    Mount,
    Mounts,
    NewTask,
    TaskRecord,
)

log = logging.getLogger(__name__)
DEFAULT_QUOTA_GROUP = "default"
#: ``quick_train(reuse=...)``: always run, or answer an identical SUCCEEDED task.
REUSE_CHOICES = ("run", "succeeded")
#: Seconds to wait for a dataset or model to become READY before giving up.
DEFAULT_RESOURCE_TIMEOUT = 3600.0


@dataclass(frozen=True)
class _Resume:
    """A saved ``quick_train`` call being finished: the connection to its server, its id
    (also its task's idempotency key) and the identity of its code and inputs back then."""

    context: SdkContext
    call_id: str
    identity: dict[str, Any]


#: Arguments that name local paths; a saved call keeps them absolute.
PATH_ARGUMENTS = ("algorithm_dir", "dataset_dir", "model_dir", "dataset_archive")
#: Errors after which a saved call is forgotten: running it again would fail the same way.
#: Others (the server unreachable, a timeout, Ctrl-C, a killed process) keep it for
#: :func:`resume_unfinished_local_train_tasks`.
PERMANENT_ERRORS = (
    InvalidArgumentError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    ConflictError,
    ResourceError,
)


def _json_arguments(given: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a ``quick_train`` call as JSON values (paths as text), without
    ``progress`` and ``_resume``, to call it again."""
    out: dict[str, Any] = {}
    for name, value in given.items():
        if name in ("progress", "_resume"):
            continue
        if name in PATH_ARGUMENTS and isinstance(value, str | os.PathLike):
            value = str(Path(value).expanduser().resolve())  # the call may resume elsewhere
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return json.loads(json.dumps(out, default=str))


def _check_unchanged(arguments: dict, then: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a resumed call whose code or inputs are not what they were.

    Raises:
        ResumeRefusedError: naming each argument that changed, with the old and new commit
            or checksum.
    """
    changed = []
    if then.get("commit") != now.get("commit"):
        changed.append(
            f"algorithm_dir {arguments.get('algorithm_dir')!r} is now commit "
            f"{str(now.get('commit'))[:12]}, not {str(then.get('commit'))[:12]}"
        )
    for name in sorted(set(then) - {"commit"} | set(now) - {"commit"}):
        if then.get(name) != now.get(name):
            changed.append(
                f"{name} {arguments.get(name)!r} now has checksum {str(now.get(name))[:12]}, "
                f"not {str(then.get(name))[:12]}"
            )
    if changed:
        raise ResumeRefusedError(
            "the interrupted quick_train call is not resumed, its code or inputs changed "
            f"since: {'; '.join(changed)}. Call quick_train again to run what is there now"
        )


def _as_list(value: str | list[str] | tuple[str, ...] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgumentError(f"{arg} must be an id or a list of ids, got {value!r}")


def _folder(value: str | Path | None, arg: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise InvalidArgumentError(f"{arg} {str(value)!r} does not exist or is not a folder")
    return path.resolve()


def check_output(output: str, algorithm_dir: Path | None) -> str:
    """Validate the task's output path against the rules and the local algorithm folder.

    It must be relative, without ``..``, not a symlink (nor below one), and absent or an empty
    folder in ``algorithm_dir`` (the code is checked out there and the folder becomes the
    task's results).

    Raises:
        InvalidArgumentError: naming the value and the rule it breaks.
    """
    try:
        output = check_relative_path(output, what="output")
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from err
    if algorithm_dir is None:
        return output
    current = algorithm_dir
    for part in output.split("/"):
        current = current / part
        if current.is_symlink():
            raise InvalidArgumentError(
                f"output {output!r}: {str(current)!r} is a symlink; use a plain folder"
            )
    if current.exists() and (not current.is_dir() or any(current.iterdir())):
        raise InvalidArgumentError(
            f"output {output!r} already exists in algorithm_dir and is not an empty folder"
        )
    return output


def _check_hyperparams(hyperparams: Mapping[str, Any] | None) -> dict[str, HyperValue]:
    if hyperparams is None:
        return {}
    if not isinstance(hyperparams, Mapping):
        raise InvalidArgumentError(f"hyperparams must be a dict, got {type(hyperparams).__name__}")
    result: dict[str, HyperValue] = {}
    for key, value in hyperparams.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"hyperparams key {key!r} must be a non-empty string")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise InvalidArgumentError(
                f"hyperparams[{key!r}] = {value!r}: use a str, int, float, bool or None"
            )
        result[key] = value
    return result


def _positive(value: Any, arg: str, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = "a positive integer" if integer else "a positive number of seconds"
        raise InvalidArgumentError(f"{arg} must be {what}, got {value!r}")


def quick_train(
    *,
    algorithm_id: str | None = None,
    algorithm_name: str | None = None,
    algorithm_dir: str | Path | None = None,
    algorithm_force_update: bool = False,
    algorithm_git_ref: str | None = None,
    dataset_hyperparam_name: str | None = "dataset",
    dataset_id: str | list[str] | None = None,
    dataset_dir: str | Path | None = None,
    dataset_archive: str | Path | None = None,
    model_hyperparam_name: str | None = "model",
    model_id: str | list[str] | None = None,
    model_dir: str | Path | None = None,
    pretrain_hyperparam_name: str | None = "pretrain",
    pretrain_task_id: str | list[str] | None = None,
    project_id: str | None = None,
    project_name: str | None = None,
    entrypoint: str | None = None,
    output: str = "output",
    mirror_name: str = "QUICKSTART",
    resource_polling: float = 5.0,
    resource_timeout: float = DEFAULT_RESOURCE_TIMEOUT,
    hyperparams: Mapping[str, HyperValue] | None = None,
    hyperparams_prefix: str = "--",
    hyperparams_delimeter: str = " ",
    quota_group_name: str | None = None,
    quota_group_request: Mapping[str, float] | None = None,
    task_name: str | None = None,
    task_description: str | None = None,
    num_nodes: int = 1,
    nproc_per_node: int = 1,
    progress: bool | ProgressCallback | None = True,
    reuse: str = "run",
    _resume: _Resume | None = None,
) -> tuple[TrainTask, Algorithm, list[Dataset], Project]:
    """Sync code and data, then create a training task on the current backend.

    Code: ``algorithm_dir`` is pinned to a commit (HEAD, ``algorithm_git_ref``, or with
    ``algorithm_force_update=True`` a snapshot of the working tree) and only that commit is
    pushed, if the server lacks it. Data: ``dataset_dir`` and ``model_dir`` are hashed (cached
    by stat), deduplicated by manifest checksum and uploaded only for the files the server
    lacks, on a worker thread, while this call polls every ``resource_polling`` seconds.

    Mounts reach the code as ``--<hyperparam_name> <path>`` (none when the name is empty or
    None), as ``ANYLEARN_DATASET_DIR``/``ANYLEARN_MODEL_DIR``/``ANYLEARN_PRETRAIN_DIR``/
    ``ANYLEARN_OUTPUT_DIR``, and as ``${VAR}`` placeholders in the entrypoint and
    hyperparameter values. Several ids of one kind are joined with commas.

    Args:
        algorithm_id: an existing algorithm (push ``algorithm_dir`` into it, or run
            ``algorithm_git_ref`` already on the server when no folder is given).
        algorithm_name: name for the algorithm (default: the folder's name).
        algorithm_dir: the code folder (a git repository, or a plain folder).
        algorithm_force_update: snapshot uncommitted changes instead of refusing them.
        algorithm_git_ref: branch, tag or sha to run instead of the working tree.
        dataset_hyperparam_name / model_hyperparam_name / pretrain_hyperparam_name: the
            hyperparameter that receives each mount's path.
        dataset_id / model_id: existing READY versions (an id or a list).
        dataset_dir / model_dir: local folders to sync.
        dataset_archive: a local zip or tar file to sync as a dataset; its members are hashed
            and uploaded from the archive (never extracted), and unsafe members are refused.
        pretrain_task_id: earlier SUCCEEDED tasks whose results are mounted.
        project_id / project_name: the project (default: the user's default project; a new
            name is created).
        entrypoint: the command, for example ``"python train.py"``.
        output: folder relative to the code root that becomes the task's results.
        mirror_name: the runtime environment (``QUICKSTART``: the server's own Python).
        resource_polling: seconds between readiness polls of uploaded data.
        resource_timeout: seconds to wait for uploaded data to become READY.
        hyperparams: ``{name: value}``; ``""`` or None makes a bare flag.
        hyperparams_prefix: ``"--"``, ``"-"``, ``""``, ``"+"``, ``"++"`` (Hydra)...
        hyperparams_delimeter: between name and value: ``" "`` or ``"="``.
        quota_group_name: the quota group (default ``"default"``).
        quota_group_request: ``{"cpu": cores, "memory_mb": MiB, "gpu": count}``.
        task_name / task_description: labels.
        num_nodes / nproc_per_node: processes launched with torchrun's environment variables.
        progress: True for tqdm bars and messages, False for silence, or a callback.
        reuse: ``"run"`` (the default) creates a task; ``"succeeded"`` returns an earlier
            SUCCEEDED task instead, without running anything, when its commit, inputs (by
            checksum), entrypoint, hyperparameters, mirror and environment key (and
            hyperparameter format, output folder, nodes × processes) are all equal, and says
            so. Code and data are still synced, since their checksums decide.

    Returns:
        ``(train_task, algorithm, datasets, project)``.

    Raises:
        InvalidArgumentError: a bad argument, unknown name or id (one line naming it).
        RequiredLocalCommitError: uncommitted changes without ``algorithm_force_update``.
        AuthenticationError: the token or password was rejected.
        ResourceError / AnylearnTimeoutError: uploaded data failed or timed out.

    From the moment the code and inputs are pinned (a commit, checksums) until the task
    exists, the call is kept in the local store, so a process that dies in between (during
    an upload, say) leaves a call that :func:`resume_unfinished_local_train_tasks` finishes.
    Ctrl-C, an error that would recur, or the same call made again forgets it.
    """
    arguments = _json_arguments(locals())
    # 1. Local checks: nothing touches the network or the disk yet.
    if not entrypoint or not isinstance(entrypoint, str):
        raise InvalidArgumentError("entrypoint is required, for example 'python train.py'")
    alg_dir = _folder(algorithm_dir, "algorithm_dir")
    data_dir = _folder(dataset_dir, "dataset_dir")
    mdl_dir = _folder(model_dir, "model_dir")
    archive = Path(dataset_archive).expanduser() if dataset_archive is not None else None
    if archive is not None and not archive.is_file():
        raise InvalidArgumentError(f"dataset_archive {str(dataset_archive)!r} is not a file")
    if alg_dir is None and (algorithm_id is None or algorithm_git_ref is None):
        raise InvalidArgumentError(
            "give algorithm_dir, or algorithm_id with algorithm_git_ref naming a pushed commit"
        )
    output = check_output(output, alg_dir)
    params = _check_hyperparams(hyperparams)
    amounts = check_amounts("quota_group_request", quota_group_request)
    request = amounts.model_dump() if amounts is not None else None
    if reuse not in REUSE_CHOICES:
        raise InvalidArgumentError(f"reuse {reuse!r}: use one of {', '.join(REUSE_CHOICES)}")
    _positive(num_nodes, "num_nodes", integer=True)
    _positive(nproc_per_node, "nproc_per_node", integer=True)
    _positive(resource_polling, "resource_polling", integer=False)
    _positive(resource_timeout, "resource_timeout", integer=False)
    dataset_ids = _as_list(dataset_id, "dataset_id")
    model_ids = _as_list(model_id, "model_id")
    pretrain_ids = _as_list(pretrain_task_id, "pretrain_task_id")
    report = resolve_progress(progress)

    # 2. Resolve every name and id on the server (read-only).
    ctx = _resume.context if _resume is not None else get_context()
    call_id = _resume.call_id if _resume is not None else uuid.uuid4().hex
    group = resolve_quota_group(ctx, quota_group_name or DEFAULT_QUOTA_GROUP)
    group.check_fits(request, num_nodes)
    mirror = resolve_mirror(ctx, mirror_name)
    found_project, new_project_name = find_project(ctx, project_id, project_name)
    existing_datasets = [get_ready(ctx, "dataset", i, "dataset_id") for i in dataset_ids]
    existing_models = [get_ready(ctx, "model", i, "model_id") for i in model_ids]
    for ref in pretrain_ids:
        try:
            earlier = TrainTask(ref, load_detail=True, context=ctx)
        except NotFoundError as err:
            raise InvalidArgumentError(f"pretrain_task_id {ref!r} not found") from err
        if earlier.state != TaskState.SUCCEEDED:
            raise InvalidArgumentError(
                f"pretrain_task_id {ref!r} is {earlier.state.value}, not SUCCEEDED"
            )
    alg_name = algorithm_name or algorithm_name_for(alg_dir.name if alg_dir else "algorithm")
    existing_alg = find_algorithm(ctx, algorithm_id, alg_name)

    draft = make_body(
        NewTask,
        name=task_name,
        description=task_description or "",
        entrypoint=entrypoint,
        hyperparams=params,
        hyperparams_prefix=hyperparams_prefix,
        hyperparams_delimiter=hyperparams_delimeter,
        mounts=Mounts(
            dataset=Mount(hyperparam_name=dataset_hyperparam_name or None),
            model=Mount(hyperparam_name=model_hyperparam_name or None),
            pretrain=Mount(ids=pretrain_ids, hyperparam_name=pretrain_hyperparam_name or None),
        ),
        output=output,
        mirror_id=mirror.id,
        quota_group_id=group.id,
        request=request,
        num_nodes=num_nodes,
        nproc_per_node=nproc_per_node,
        reuse=reuse,
        algorithm_id="",  # known once the algorithm is synced
        commit="",
    )

    # 3. Local work: pin the code, hash the data. Only objects leave meanwhile (preuploads of
    # small files, which are the user's objects and no version): nothing is created yet.
    try:
        if alg_dir is not None:
            snap = gitsync.snapshot(
                alg_dir,
                force=algorithm_force_update,
                git_ref=algorithm_git_ref,
                scratch_root=ctx.settings.home / "snapshots",
            )
        else:
            snap = None
        identity: dict[str, Any] = {"commit": snap.commit if snap else algorithm_git_ref}
        # (kind, manifest, name, its preuploads: sent while it was hashed)
        manifests: list[tuple[str, Manifest, str, Preuploads | None]] = []
        for kind, folder in (("dataset", data_dir), ("model", mdl_dir)):
            if folder is not None:
                with preuploads_for(ctx, folder, report, folder.name) as early:
                    manifest = build_and_preupload(ctx, folder, report, folder.name, early)
                    early.finish()  # before anything is created on the server
                manifests.append((kind, manifest, folder.name, early))
                identity[f"{kind}_dir"] = manifest.checksum
        if archive is not None:
            name = algorithm_name_for(archive.name.split(".")[0])
            manifest = archive_manifest(archive, ctx.store, report, name)
            manifests.append(("dataset", manifest, name, None))
            identity["dataset_archive"] = manifest.checksum
        if _resume is not None:
            _check_unchanged(arguments, _resume.identity, identity)
        else:
            host, username = ctx.settings.host, ctx.settings.username
            ctx.store.save_call(ctx.server_id, call_id, host, username, arguments, identity)
        submitted = _submit(
            ctx,
            report,
            snap=snap,
            manifests=manifests,
            found_project=found_project,
            new_project_name=new_project_name,
            existing_alg=existing_alg,
            alg_name=alg_name,
            algorithm_id=algorithm_id,
            algorithm_git_ref=algorithm_git_ref,
            existing=(existing_datasets, existing_models),
            resource_polling=resource_polling,
            resource_timeout=resource_timeout,
            draft=draft,
            call_id=call_id,
        )
        for _, manifest, _, _ in manifests:
            manifest.saved()  # written while the call went on
        return submitted
    except PERMANENT_ERRORS:
        ctx.store.drop_call(ctx.server_id, call_id)  # running it again would fail the same way
        raise
    except KeyboardInterrupt:
        # The user stopped it and will run it again (the message says so): not to be resumed.
        ctx.store.drop_call(ctx.server_id, call_id)
        report.message(INTERRUPTED_MESSAGE)
        raise


def _submit(
    ctx: SdkContext,
    report: ProgressCallback,
    *,
    snap: gitsync.Snapshot | None,
    manifests: list[tuple[str, Manifest, str, Preuploads | None]],
    found_project: Project | None,
    new_project_name: str | None,
    existing_alg: AlgorithmRecord | None,
    alg_name: str,
    algorithm_id: str | None,
    algorithm_git_ref: str | None,
    existing: tuple[list[Dataset], list[Dataset]],
    resource_polling: float,
    resource_timeout: float,
    draft: NewTask,
    call_id: str,
) -> tuple[TrainTask, Algorithm, list[Dataset], Project]:
    """Create on the server what is missing, upload data, then create the task (``draft``
    with its algorithm, commit, project and mounts filled in; ``call_id`` is its
    idempotency key, so a resumed call whose first try created the task gets that task)."""

    # 4. Create what is missing on the server.
    project = ensure_project(ctx, found_project, new_project_name)
    if snap is not None:
        algorithm = sync_algorithm(ctx, existing_alg, alg_name, project.id, snap, report)
    else:
        if not has_commit(ctx, algorithm_id, algorithm_git_ref):
            raise InvalidArgumentError(
                f"algorithm_git_ref {algorithm_git_ref!r} is not a commit "
                f"of algorithm {algorithm_id}"
            )
        if existing_alg is None:  # pragma: no cover - find_algorithm raised already
            raise InvalidArgumentError(f"algorithm_id {algorithm_id!r} not found")
        algorithm = Algorithm(existing_alg.id, existing_alg.name, algorithm_git_ref)
    synced: dict[str, list[Dataset]] = {"dataset": [], "model": []}
    # On Ctrl-C every upload thread ends within one chunk read; the journal keeps every unit.
    with stoppable_pool(2, "anylearn-upload") as (pool, stop):
        pending = [
            start_sync(
                ctx,
                kind,
                manifest,
                name,
                project.id,
                pool,
                report,
                interrupt=stop,
                early=early,
            )
            for kind, manifest, name, early in manifests
        ]
        for item in pending:
            synced[item.resource.kind].append(
                await_ready(
                    ctx, item, polling=resource_polling, timeout=resource_timeout, progress=report
                )
            )
    datasets = existing[0] + synced["dataset"]
    models = existing[1] + synced["model"]
    mounts = draft.mounts.model_copy(
        update={
            "dataset": draft.mounts.dataset.model_copy(update={"ids": [d.id for d in datasets]}),
            "model": draft.mounts.model.model_copy(update={"ids": [m.id for m in models]}),
        }
    )
    body = draft.model_copy(
        update={
            "name": draft.name or algorithm.name,
            "project_id": project.id,
            "algorithm_id": algorithm.id,
            "commit": algorithm.commit,
            "mounts": mounts,
        }
    )
    headers = {IDEMPOTENCY_HEADER: call_id}
    response = ctx.api.request(
        "POST",
        "/train-tasks",
        json=body.model_dump(mode="json", exclude_unset=True),
        headers=headers,
    )
    record = TaskRecord.model_validate_json(response.content)
    task = TrainTask(record.id, context=ctx, record=record)
    if response.headers.get(REUSED_HEADER):
        ctx.store.drop_call(ctx.server_id, call_id)
        report.message(
            f"reusing task {task.id} ({task.state.value}): an identical run at commit "
            f"{algorithm.commit[:12]}; nothing was started"
        )
        return task, algorithm, datasets, project
    ctx.store.record_task(
        ctx.server_id,
        ctx.settings.host,
        ctx.settings.username,
        record.model_dump(mode="json"),
        call_id=call_id,
    )
    report.message(f"task {task.id} created ({task.state.value}) at commit {algorithm.commit[:12]}")
    return task, algorithm, datasets, project


def resume_unfinished_local_train_tasks() -> list[TrainTask]:
    """Pick up, after the Python process that made them died, every task this machine made.

    1. Every task the local store last saw unfinished is refreshed from the server that runs
       it: tasks of the current backend through the current connection, tasks of other
       backends through the host and token recorded for them, when reachable.
    2. Every ``quick_train`` call that pinned its code and inputs but died before its task
       existed (during an upload, say) is finished: its code is pinned and its inputs hashed
       again (from the hash cache, so unchanged data costs a directory walk), what the server
       lacks is uploaded (resuming the interrupted uploads), and the task is created with the
       call's idempotency key, so a task the first try did create is found, not doubled. A
       call whose code or inputs changed since is refused and forgotten, with a warning
       naming what changed (:class:`~anylearn_sdk.errors.ResumeRefusedError`'s message).

    Returns:
        The refreshed tasks (some may now be terminal), oldest first, then the tasks of
        the finished calls. Servers that cannot be reached are skipped with a warning in the
        ``anylearn_sdk`` log (their calls are kept for the next time).
    """
    ctx = get_context()
    contexts: dict[str, SdkContext | None] = {ctx.server_id: ctx}

    def reach(row: dict) -> SdkContext | None:
        server = row["server"]
        if server not in contexts:
            contexts[server] = _context_for(ctx, row["host"], server)
        return contexts[server]

    tasks: list[TrainTask] = []
    for row in ctx.store.unfinished_tasks():
        task_ctx = reach(row)
        if task_ctx is None:
            log.warning(
                "task %s: its server %s cannot be reached; skipped", row["task_id"], row["host"]
            )
            continue
        try:
            tasks.append(TrainTask(row["task_id"], load_detail=True, context=task_ctx))
        except NotFoundError:
            log.warning("task %s no longer exists on %s", row["task_id"], row["host"])
            ctx.store.update_task_state(row["server"], row["task_id"], TaskState.CANCELLED.value)
    for row in ctx.store.pending_calls():
        if row["pid"] != os.getpid() and _alive(row["pid"]):
            log.info("a quick_train call of process %s is still running; left to it", row["pid"])
            continue
        call_ctx = reach(row)
        if call_ctx is None:
            log.warning(
                "an interrupted quick_train call for %s: the server cannot be reached; kept",
                row["host"],
            )
            continue
        task = _finish_call(call_ctx, row)
        if task is not None:
            tasks.append(task)
    return tasks


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process holds that pid now: not ours, but alive
    return True


def _finish_call(ctx: SdkContext, row: dict) -> TrainTask | None:
    """Run a saved call again (see :func:`resume_unfinished_local_train_tasks`); its task, or
    None after a warning."""
    resume = _Resume(ctx, row["call_id"], row["identity"])
    try:
        return quick_train(**row["arguments"], progress=False, _resume=resume)[0]
    except PERMANENT_ERRORS as err:
        ctx.store.drop_call(row["server"], row["call_id"])
        log.warning("an interrupted quick_train call was forgotten: %s", err)
    except AnylearnError as err:
        log.warning("an interrupted quick_train call could not be finished now: %s", err)
    return None


def _context_for(current: SdkContext, host: str, server_id: str) -> SdkContext | None:
    if server_id_of(host) != server_id:
        return None
    token, username = stored_token(current.settings.home, host)
    if token is None:
        return None
    settings = replace(current.settings, host=host, token=token, username=username, embedded=False)
    return SdkContext(settings=settings, api=ApiClient(host, token), server_id=server_id)
