"""A task's experiment record: code, data, parameters, environment, run and results.

The record is assembled when asked (``GET /train-tasks/{id}/record``) from what the backend
already keeps: the task's row, its commit in the algorithm's repository, its inputs' rows, its
log, and two kinds of files in its folder:

* the JSON lines :mod:`anylearn_sdk.tracking` appends (``.anylearn/tracking.jsonl``, and on
  the Ray executor one copy per node, ``.anylearn/tracking-node<N>.jsonl``, pulled like the
  log);
* TensorBoard event files (``events.out.tfevents.*``) anywhere under the output folder, read
  with TensorBoard's own ``EventAccumulator``, so code that already writes scalars with
  ``torch.utils.tensorboard``, tensorboardX or ``tf.summary`` needs no change.

While a task runs, both grow, and so do the series from one read to the next. Parsing is
incremental: a tracking file is read from where the last read stopped, and output files are
hashed again only when their size or modification time changed (a cache beside the log).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from anylearn_sdk.content.hashing import hash_file
from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.db import Algorithm, Mirror, QuotaGroup, Resource, TrainTask
from anylearn_sdk.server.environments import REQUIREMENTS_FILE, environment_key
from anylearn_sdk.server.failures import last_traceback
from anylearn_sdk.server.workspace import TaskPaths
from anylearn_sdk.states import TaskState
from anylearn_sdk.wire import (
    CodeRecord,
    DataRecord,
    EnvironmentRecord,
    ExperimentRecord,
    MetricSeries,
    OutputFile,
    ParametersRecord,
    ResultsRecord,
    RunRecord,
    TaskInput,
)

log = logging.getLogger(__name__)

#: Most output files a record lists (``outputs_truncated`` says there were more).
MAX_OUTPUT_FILES = 10_000
#: Most points a series keeps; a longer one is thinned evenly, its last point kept.
MAX_POINTS = 10_000
#: Where output digests are cached, in the task's ``.anylearn`` folder.
OUTPUT_CACHE = "outputs.json"
TB_EVENT_PREFIX = "events.out.tfevents."
#: Earlier tasks of one commit and mirror compared when looking for an identical run.
MAX_REUSE_CANDIDATES = 200


# tracking files ---------------------------------------------------------------------------
@dataclass
class _Parsed:
    """What one tracking file said so far, and where reading stopped."""

    inode: int = 0
    offset: int = 0
    points: dict[str, dict[int, list[tuple[int, float, float]]]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    steps: dict[tuple[str, int], int] = field(default_factory=dict)


class _TrackingFiles:
    """Parsed tracking files, kept per path and read on from their last offset."""

    SIZE = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _Parsed] = OrderedDict()

    def read(self, path: Path) -> _Parsed:
        """What ``path`` says now: a copy, which later reads of the same file leave as is."""
        key = str(path)
        with self._lock:
            parsed = self._files.pop(key, None) or _Parsed()
            try:
                parsed = _read_on(path, parsed)
            finally:
                self._files[key] = parsed
                while len(self._files) > self.SIZE:
                    self._files.popitem(last=False)
            return _Parsed(
                points={
                    k: {r: list(p) for r, p in ranks.items()} for k, ranks in parsed.points.items()
                },
                params=dict(parsed.params),
                tags=dict(parsed.tags),
            )


def _read_on(path: Path, parsed: _Parsed) -> _Parsed:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_ino != parsed.inode or st.st_size < parsed.offset:
                parsed = _Parsed(inode=st.st_ino)  # replaced or truncated: from the start
            f.seek(parsed.offset)
            data = f.read()
    except FileNotFoundError:
        return parsed
    end = data.rfind(b"\n") + 1  # whole lines only; a line being written is read next time
    for line in data[:end].splitlines():
        _take(parsed, line)
    parsed.offset += end
    return parsed


def _take(parsed: _Parsed, line: bytes) -> None:
    """Add one JSON line; a line that is not one the tracking module writes is skipped."""
    try:
        item = json.loads(line)
        kind, key, value = item["kind"], str(item["key"]), item["value"]
        rank = int(item.get("rank", 0))
        when = float(item.get("time", 0.0))
    except (ValueError, KeyError, TypeError):
        return
    if kind == "metric":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if not math.isfinite(value):
            return
        step = item.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            step = parsed.steps.get((key, rank), -1) + 1
        parsed.steps[(key, rank)] = step
        parsed.points.setdefault(key, {}).setdefault(rank, []).append((step, when, float(value)))
    elif kind == "param":
        parsed.params[key] = str(value)
    elif kind == "tag":
        parsed.tags[key] = str(value)


_tracking = _TrackingFiles()


def tracking_files(paths: TaskPaths) -> list[Path]:
    """The task's tracking file and the copies pulled from Ray nodes, in node order."""
    nodes: list[Path] = []
    while (copy := paths.node_tracking(len(nodes))).exists():
        nodes.append(copy)
    return [paths.tracking, *nodes]


def _series(key: str, source: str, points: list[tuple[int, float, float]]) -> MetricSeries:
    """A series of ``(step, time, value)`` points, sorted by step then time; its summary
    covers every point, its lists at most :data:`MAX_POINTS` (thinned evenly, the last kept)."""
    points = sorted(points)
    values = [p[2] for p in points]
    summary = {"last": values[-1], "min": min(values), "max": max(values)} if values else {}
    if len(points) > MAX_POINTS:
        stride = len(points) / MAX_POINTS
        points = [points[int(i * stride)] for i in range(MAX_POINTS - 1)] + [points[-1]]
    return MetricSeries(
        key=key,
        source=source,
        steps=[p[0] for p in points],
        timestamps=[p[1] for p in points],
        values=[p[2] for p in points],
        **summary,
    )


def logged(paths: TaskPaths) -> tuple[dict[str, MetricSeries], dict[str, str], dict[str, str]]:
    """The series, parameters and tags the task logged with :mod:`anylearn_sdk.tracking`.

    A key logged by several ranks is the series of the lowest rank that logged it (rank 0
    under ``torchrun`` and DDP, as MLflow's and Lightning's loggers do); params and tags of
    every node are merged, a later value of a key replacing an earlier one.
    """
    by_key: dict[str, dict[int, list]] = {}
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    for path in tracking_files(paths):
        parsed = _tracking.read(path)
        for key, ranks in parsed.points.items():
            for rank, points in ranks.items():
                by_key.setdefault(key, {}).setdefault(rank, []).extend(points)
        params.update(parsed.params)
        tags.update(parsed.tags)
    series = {
        key: _series(key, "log_metrics", ranks[min(ranks)]) for key, ranks in sorted(by_key.items())
    }
    return series, params, tags


# TensorBoard ------------------------------------------------------------------------------
class _Accumulators:
    """One TensorBoard ``EventAccumulator`` per folder, kept so that each read loads only
    the events written since the last (``Reload`` goes on from where it stopped)."""

    SIZE = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: OrderedDict[str, Any] = OrderedDict()

    def scalars(self, folder: Path) -> dict[str, list[tuple[int, float, float]]]:
        """Points ``(step, time, value)`` by tag, of the event files in ``folder``."""
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util

        key = str(folder)
        with self._lock:
            acc = self._folders.pop(key, None)
            if acc is None:
                acc = event_accumulator.EventAccumulator(
                    key,
                    size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
                )
            self._folders[key] = acc
            while len(self._folders) > self.SIZE:
                self._folders.popitem(last=False)
            acc.Reload()
            tags = acc.Tags()
            out = {
                tag: [(e.step, e.wall_time, float(e.value)) for e in acc.Scalars(tag)]
                for tag in tags.get("scalars", [])
            }
            for tag in tags.get("tensors", []):  # tf.summary.scalar in TensorFlow 2
                points = []
                for e in acc.Tensors(tag):
                    value = tensor_util.make_ndarray(e.tensor_proto)
                    if value.size == 1:
                        points.append((e.step, e.wall_time, float(value.reshape(-1)[0])))
                if points:
                    out[tag] = points
            return out

    def forget(self, folder: Path) -> None:
        with self._lock:
            self._folders.pop(str(folder), None)


_accumulators = _Accumulators()


def tensorboard_series(output: Path) -> dict[str, MetricSeries]:
    """Scalars of the TensorBoard event files under ``output``, by tag; with event files in
    several folders, each tag is prefixed by its folder (relative to ``output``). Empty if
    there are none, or if TensorBoard is not installed (logged)."""
    folders = sorted({p.parent for p in _event_files(output)})
    if not folders:
        return {}
    try:
        import tensorboard  # noqa: F401 - only to know whether it is there
    except ImportError:
        log.warning("TensorBoard is not installed: event files under %s are not read", output)
        return {}
    out: dict[str, MetricSeries] = {}
    for folder in folders:
        try:
            scalars = _accumulators.scalars(folder)
        except Exception:  # noqa: BLE001 - a corrupt or half-written file reads as nothing
            log.warning("cannot read TensorBoard events in %s", folder, exc_info=True)
            _accumulators.forget(folder)
            continue
        prefix = "" if len(folders) == 1 else f"{folder.relative_to(output).as_posix()}/"
        for tag, points in scalars.items():
            out[prefix + tag] = _series(prefix + tag, "tensorboard", _finite(points))
    return out


def _finite(points: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    return [p for p in points if math.isfinite(p[2])]


def _event_files(output: Path) -> Iterable[Path]:
    if not output.is_dir():
        return []
    return (
        Path(root) / name
        for root, _dirs, names in os.walk(output)
        for name in names
        if name.startswith(TB_EVENT_PREFIX)
    )


def results(paths: TaskPaths) -> tuple[dict[str, MetricSeries], dict[str, str], dict[str, str]]:
    """Every series of the task, with the parameters and tags it logged: what it logged,
    then TensorBoard's scalars (a tag that collides with a logged key is named
    ``tensorboard/<tag>``)."""
    series, params, tags = logged(paths)
    for key, tb in tensorboard_series(paths.output).items():
        name = key if key not in series else f"tensorboard/{key}"
        series[name] = tb.model_copy(update={"key": name})
    return series, params, tags


# outputs ----------------------------------------------------------------------------------
_output_lock = threading.Lock()


def output_files(paths: TaskPaths) -> tuple[list[OutputFile], bool]:
    """The output folder's regular files (symlinks skipped) with size and sha256, sorted by
    path, at most :data:`MAX_OUTPUT_FILES`; and whether there were more. Digests are cached
    by (size, mtime) in ``.anylearn/outputs.json``, so only changed files are hashed."""
    if not paths.output.is_dir():
        return [], False
    cache_path = paths.tracking.parent / OUTPUT_CACHE
    with _output_lock:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        found: list[tuple[str, os.stat_result]] = []
        truncated = False
        for root, dirs, names in os.walk(paths.output):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if len(found) == MAX_OUTPUT_FILES:
                    truncated = True
                    break
                found.append((os.path.relpath(full, paths.output), st))
            if truncated:
                break
        files, fresh = [], {}
        for rel, st in found:
            known = cache.get(rel)
            stamp = [st.st_size, st.st_mtime_ns]
            if isinstance(known, list) and known[:2] == stamp:
                digest = known[2]
            else:
                try:
                    digest = hash_file(str(paths.output / rel))
                except (OSError, ValueError):
                    continue  # removed or changing while it was read: listed next time
            fresh[rel] = [*stamp, digest]
            files.append(OutputFile(path=Path(rel).as_posix(), bytes=st.st_size, sha256=digest))
        if fresh != cache and cache_path.parent.is_dir():
            tmp = cache_path.with_suffix(".tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(fresh))
                os.replace(tmp, cache_path)
    files.sort(key=lambda f: f.path)
    return files, truncated


# the record -------------------------------------------------------------------------------
def task_inputs(session: Session, task: TrainTask) -> list[TaskInput]:
    """Each mount's kind and id, and for datasets and models their name, checksum, file
    count and size in bytes."""
    inputs = []
    for kind in ("dataset", "model", "pretrain"):
        for ref in (task.mounts.get(kind) or {}).get("ids") or []:
            res = session.get(Resource, ref) if kind != "pretrain" else None
            details: dict[str, Any] = {}
            if res is not None:
                details = dict(
                    name=res.name,
                    checksum=res.checksum,
                    file_count=res.file_count,
                    total_bytes=res.total_bytes,
                )
            inputs.append(TaskInput(kind=kind, id=ref, **details))
    return inputs


def code_record(session: Session, task: TrainTask, repos_root: Path) -> CodeRecord:
    alg = session.get(Algorithm, task.algorithm_id)
    repo = repos_root / f"{task.algorithm_id}.git"
    info = gitrepos.commit_info(repo, task.commit)
    base, changed = None, []
    if info is not None and info.snapshot and info.parents:
        base = info.parents[0]
        changed = gitrepos.changed_paths(repo, base, task.commit)
    return CodeRecord(
        algorithm_id=task.algorithm_id,
        algorithm=alg.name if alg else "",
        commit=task.commit,
        message=info.message if info else "",
        snapshot=bool(info and info.snapshot),
        base_commit=base,
        changed_files=changed,
    )


def experiment_record(
    session: Session, task: TrainTask, *, repos_root: Path, tasks_root: Path, backend: str
) -> ExperimentRecord:
    """The whole record of ``task`` (see the module docstring)."""
    paths = TaskPaths.of(tasks_root, task)
    runtime = task.runtime or {}
    mirror = session.get(Mirror, task.mirror_id)
    group = session.get(QuotaGroup, task.quota_group_id)
    series, params, tags = results(paths)
    outputs, truncated = output_files(paths)
    traceback = last_traceback(paths.log)
    return ExperimentRecord(
        task_id=task.id,
        name=task.name,
        description=task.description,
        backend=backend,
        code=code_record(session, task, repos_root),
        data=DataRecord(
            inputs=[i for i in task_inputs(session, task) if i.kind != "pretrain"],
            pretrain=list((task.mounts.get("pretrain") or {}).get("ids") or []),
        ),
        parameters=ParametersRecord(
            hyperparams=task.hyperparams,
            entrypoint=task.entrypoint,
            command=task.command,
            logged=params,
            tags=tags,
        ),
        environment=EnvironmentRecord(
            mirror_id=task.mirror_id,
            mirror=mirror.name if mirror else None,
            python=runtime.get("python") or (mirror.python if mirror else None),
            python_version=runtime.get("python_version"),
            environment=runtime.get("environment"),
            packages=runtime.get("packages") or [],
            gpus=runtime.get("gpus") or [],
            nodes=runtime.get("nodes") or [],
            num_nodes=task.num_nodes,
            nproc_per_node=task.nproc_per_node,
        ),
        run=RunRecord(
            state=task.state,
            quota_group=group.name if group else None,
            request=task.request,
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            attempts=task.attempt,
            exit_code=task.exit_code,
            error=task.error,
            exception=traceback[1] if traceback else None,
            traceback=traceback[0] if traceback else None,
        ),
        results=ResultsRecord(metrics=series, outputs=outputs, outputs_truncated=truncated),
    )


# identical runs ---------------------------------------------------------------------------
#: What makes two runs the same experiment, in the order a difference is named: the six the
#: user chooses, then how the run is laid out (hyperparameter format, output folder, nodes ×
#: processes), which a reused result must share too.
IDENTITY = (
    "commit",
    "inputs",
    "entrypoint",
    "hyperparameters",
    "mirror",
    "environment",
    "layout",
)


def inputs_identity(session: Session, mounts: dict[str, Any]) -> list[Any]:
    """The inputs as content: for datasets and models, the hyperparameter that receives them
    and their checksums in mount order; for earlier tasks' results, their ids."""
    out: list[Any] = []
    for kind in ("dataset", "model", "pretrain"):
        mount = mounts.get(kind) or {}
        ids = mount.get("ids") or []
        if kind != "pretrain":
            rows = [session.get(Resource, ref) for ref in ids]
            ids = [
                row.checksum if row is not None else ref for row, ref in zip(rows, ids, strict=True)
            ]
        out.append([kind, mount.get("hyperparam_name") if ids else None, ids])
    return out


def environment_identity(repo: Path, commit: str, python: str) -> str:
    """The environment a run of ``commit`` over the interpreter ``python`` gets: the key of
    the environment its requirements.txt asks for, or ``python:<interpreter>`` without one."""
    requirements = gitrepos.read_file(repo, commit, REQUIREMENTS_FILE)
    if requirements is None:
        return f"python:{python}"
    return environment_key(python, requirements)


def task_identity(session: Session, task: TrainTask) -> dict[str, Any]:
    """:data:`IDENTITY` of a task that ran (its environment as its attempt recorded it)."""
    runtime = task.runtime or {}
    return {
        "commit": task.commit,
        "inputs": inputs_identity(session, task.mounts),
        "entrypoint": task.entrypoint,
        "hyperparameters": task.hyperparams,
        "mirror": task.mirror_id,
        "environment": runtime.get("environment") or f"python:{runtime.get('python')}",
        "layout": [
            task.hyperparams_prefix,
            task.hyperparams_delimiter,
            task.output,
            task.num_nodes,
            task.nproc_per_node,
        ],
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The :data:`IDENTITY` names whose values differ between ``a`` and ``b``."""
    return [name for name in IDENTITY if a.get(name) != b.get(name)]


def find_identical(session: Session, owner_id: str, identity: dict[str, Any]) -> TrainTask | None:
    """The newest SUCCEEDED task of ``owner_id`` whose :func:`task_identity` equals
    ``identity``, or None."""
    candidates = session.scalars(
        select(TrainTask)
        .where(
            TrainTask.owner_id == owner_id,
            TrainTask.state == TaskState.SUCCEEDED.value,
            TrainTask.commit == identity["commit"],
            TrainTask.mirror_id == identity["mirror"],
        )
        .order_by(TrainTask.created_at.desc())
        .limit(MAX_REUSE_CANDIDATES)
    )
    for task in candidates:
        if task.entrypoint == identity["entrypoint"] and not differences(
            task_identity(session, task), identity
        ):
            return task
    return None
