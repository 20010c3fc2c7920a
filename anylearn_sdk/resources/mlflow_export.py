"""Export a task's experiment record to MLflow as one run (the ``mlflow`` extra).

One task is one MLflow run, found again by its ``anylearn.task_id`` tag, so exporting twice
updates the run instead of making a second: parameters are logged once (MLflow's parameters
are immutable, and the record's do not change once the task ended), metric points the run
already has are not logged again, tags and artifacts are overwritten.

What goes where:

* parameters: the hyperparameters as given, then what the code logged with ``log_params``;
* metrics: every point of every series, with its step and timestamp (milliseconds);
* tags: ``anylearn.task_id``, ``anylearn.backend``, ``anylearn.algorithm``,
  ``anylearn.commit`` and MLflow's own ``mlflow.source.git.commit``, ``anylearn.snapshot``
  (``true`` for a snapshot of uncommitted changes), ``anylearn.entrypoint``,
  ``anylearn.command``, ``anylearn.mirror``, ``anylearn.environment``, per input
  ``anylearn.<kind>.<name>`` = its checksum, the tags the code set with ``set_tags``, and
  ``mlflow.note.content`` (the description);
* artifacts: the output folder's files, refused as a whole above the size limit;
* status and times: FINISHED, FAILED or KILLED, from the task's start and end.
"""

from __future__ import annotations

import re
import tempfile
from typing import TYPE_CHECKING, Any

from anylearn_sdk.errors import InvalidArgumentError, TaskStateError
from anylearn_sdk.states import TaskState

if TYPE_CHECKING:
    from anylearn_sdk.resources.train_task import TrainTask
    from anylearn_sdk.wire import ExperimentRecord

#: The tag that ties an MLflow run to its task.
TASK_TAG = "anylearn.task_id"
#: MLflow's limits: characters of a parameter value and of a tag value; parameters (and
#: tags) and metrics in one ``log_batch``.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
MAX_BATCH_PARAMS = 100
MAX_BATCH_METRICS = 1000
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
_STATUS = {
    TaskState.SUCCEEDED: "FINISHED",
    TaskState.FAILED: "FAILED",
    TaskState.CANCELLED: "KILLED",
}
MIB = 1024 * 1024


def mlflow_key(key: str) -> str:
    """``key`` with the characters MLflow refuses in a name replaced by ``_`` (at most 250)."""
    return _KEY_CHARS.sub("_", key)[:250] or "_"


def _ms(when: Any) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def _tags(record: ExperimentRecord) -> dict[str, str]:
    code, env, params = record.code, record.environment, record.parameters
    tags = {mlflow_key(k): v for k, v in params.tags.items()}
    tags.update(
        {
            TASK_TAG: record.task_id,
            "anylearn.backend": record.backend,
            "anylearn.algorithm": code.algorithm,
            "anylearn.commit": code.commit,
            "mlflow.source.git.commit": code.commit,
            "anylearn.snapshot": "true" if code.snapshot else "false",
            "anylearn.entrypoint": params.entrypoint,
            "anylearn.command": params.command or "",
            "anylearn.mirror": env.mirror or env.mirror_id,
            "anylearn.environment": env.environment or "",
            "mlflow.runName": record.name,
        }
    )
    if record.description:
        tags["mlflow.note.content"] = record.description
    for item in record.data.inputs:
        tags[mlflow_key(f"anylearn.{item.kind}.{item.name or item.id}")] = item.checksum or ""
    if record.data.pretrain:
        tags["anylearn.pretrain"] = ",".join(record.data.pretrain)
    return {k: v[:MAX_TAG_CHARS] for k, v in tags.items()}


def _params(record: ExperimentRecord) -> dict[str, str]:
    params = {mlflow_key(k): str(v) for k, v in record.parameters.hyperparams.items()}
    params.update({mlflow_key(k): v for k, v in record.parameters.logged.items()})
    return {k: v[:MAX_PARAM_CHARS] for k, v in params.items()}


def _check(task: TrainTask, record: ExperimentRecord, allow_dirty: bool, limit: float) -> None:
    if not record.run.state.is_terminal:
        raise TaskStateError(
            f"task {task.id} is {record.run.state.value}; export it once it has finished"
        )
    code = record.code
    if code.snapshot and not allow_dirty:
        what = (
            f"uncommitted changes over {code.base_commit[:12]} ({len(code.changed_files)} "
            f"file(s): {', '.join(code.changed_files[:5])})"
            if code.base_commit
            else "a folder without git"
        )
        raise InvalidArgumentError(
            f"task {task.id} ran commit {code.commit[:12]}, a snapshot of {what}; commit the "
            "code and run it again, or export it anyway with --allow-dirty (allow_dirty=True)"
        )
    total = sum(f.bytes for f in record.results.outputs)
    if total > limit * MIB:
        raise InvalidArgumentError(
            f"the output files of task {task.id} total {total} bytes ({total / MIB:.1f} MiB) "
            f"in {len(record.results.outputs)} files, over --max-artifact-mb {limit:g}; "
            "raise the limit"
        )


def export_task(
    task: TrainTask,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    max_artifact_mb: float,
    allow_dirty: bool,
) -> str:
    """See :meth:`TrainTask.export_mlflow`; returns the MLflow run's id."""
    if isinstance(max_artifact_mb, bool) or not isinstance(max_artifact_mb, int | float):
        raise InvalidArgumentError(f"max_artifact_mb {max_artifact_mb!r}: use a number >= 0")
    if max_artifact_mb < 0:
        raise InvalidArgumentError(f"max_artifact_mb {max_artifact_mb!r}: use a number >= 0")
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise InvalidArgumentError(
            "exporting to MLflow needs mlflow: pip install 'anylearn-sdk[mlflow]'"
        ) from None
    record = task.record()
    _check(task, record, allow_dirty, max_artifact_mb)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = "0"
    if experiment:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TASK_TAG}` = '{task.id}'", max_results=1
    )
    if runs:
        run_id = runs[0].info.run_id
        known_params = runs[0].data.params
    else:
        start = record.run.started_at or record.run.created_at
        run = client.create_run(
            experiment_id, start_time=_ms(start), tags={TASK_TAG: task.id}, run_name=record.name
        )
        run_id, known_params = run.info.run_id, {}
    params = [Param(k, v) for k, v in _params(record).items() if known_params.get(k) != v]
    tags = [RunTag(k, v) for k, v in _tags(record).items()]
    metrics = []
    for key, series in record.results.metrics.items():
        name = mlflow_key(key)
        have = {(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, name)}
        for step, when, value in zip(series.steps, series.timestamps, series.values, strict=True):
            point = (step, int(when * 1000), value)
            if point not in have:
                have.add(point)
                metrics.append(Metric(name, value, point[1], step))
    for i in range(0, len(params), MAX_BATCH_PARAMS):
        client.log_batch(run_id, params=params[i : i + MAX_BATCH_PARAMS])
    for i in range(0, len(tags), MAX_BATCH_PARAMS):
        client.log_batch(run_id, tags=tags[i : i + MAX_BATCH_PARAMS])
    for i in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH_METRICS])
    if record.results.outputs:
        with tempfile.TemporaryDirectory(prefix="anylearn-mlflow-") as tmp:
            task.download_results(tmp, allow_partial=True)
            client.log_artifacts(run_id, tmp)
    status = _STATUS.get(record.run.state, "FINISHED")
    client.set_terminated(run_id, status=status, end_time=_ms(record.run.finished_at))
    return run_id
