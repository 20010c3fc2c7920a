"""anylearn_sdk: send training jobs from a laptop to a cluster.

One call, :func:`quick_train`, pins a local code folder to a git commit, deduplicates and
uploads a local data folder by content, and creates a training task on a backend: the one
named by :func:`init_sdk`, ``ANYLEARN_HOST`` or ``anylearn login``, or else the embedded local
backend the SDK starts on 127.0.0.1.

The public names load on first use (PEP 562, as huggingface_hub does), so ``import
anylearn_sdk`` stays cheap and the server, which imports only the shared modules
(``states``, ``wire``, ``protocol``, ``datadir``, ``tracking``), never loads the client through
this file.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from anylearn_sdk._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public name → the module that defines it.
_LAZY = {
    "log_metrics": "anylearn_sdk.tracking",
    "log_params": "anylearn_sdk.tracking",
    "set_tags": "anylearn_sdk.tracking",
    "Algorithm": "anylearn_sdk.resources",
    "AnylearnError": "anylearn_sdk.errors",
    "Dataset": "anylearn_sdk.resources",
    "Mirror": "anylearn_sdk.resources",
    "Model": "anylearn_sdk.resources",
    "Preview": "anylearn_sdk.sync",
    "Project": "anylearn_sdk.resources",
    "QuotaGroup": "anylearn_sdk.resources",
    "RequiredLocalCommitError": "anylearn_sdk.errors",
    "ResourceState": "anylearn_sdk.states",
    "TaskState": "anylearn_sdk.states",
    "TrainTask": "anylearn_sdk.resources",
    "init_sdk": "anylearn_sdk.session",
    "preview_dataset": "anylearn_sdk.sync",
    "quick_train": "anylearn_sdk.quickstart",
    "resume_unfinished_local_train_tasks": "anylearn_sdk.quickstart",
    "sync_dataset": "anylearn_sdk.sync",
    "sync_model": "anylearn_sdk.sync",
    "NewTokenSecret": "anylearn_sdk.resources",
    "Token": "anylearn_sdk.resources",
    "User": "anylearn_sdk.resources",
    "add_mirror": "anylearn_sdk.resources",
    "add_quota_group": "anylearn_sdk.resources",
    "add_user": "anylearn_sdk.resources",
    "create_token": "anylearn_sdk.resources",
    "delete_dataset": "anylearn_sdk.resources",
    "delete_model": "anylearn_sdk.resources",
    "follow_train_tasks": "anylearn_sdk.resources",
    "list_datasets": "anylearn_sdk.resources",
    "list_mirrors": "anylearn_sdk.resources",
    "list_models": "anylearn_sdk.resources",
    "list_quota_groups": "anylearn_sdk.resources",
    "list_tokens": "anylearn_sdk.resources",
    "list_train_tasks": "anylearn_sdk.resources",
    "list_users": "anylearn_sdk.resources",
    "newest_train_task": "anylearn_sdk.resources",
    "remove_quota_group": "anylearn_sdk.resources",
    "remove_user": "anylearn_sdk.resources",
    "resolve_task_id": "anylearn_sdk.resources",
    "revoke_token": "anylearn_sdk.resources",
    "set_mirror": "anylearn_sdk.resources",
    "set_quota_group": "anylearn_sdk.resources",
    "whoami": "anylearn_sdk.resources",
    "TaskFailedError": "anylearn_sdk.errors",
    "TaskSummary": "anylearn_sdk.wire",
    "TaskRecord": "anylearn_sdk.wire",
    "ExperimentRecord": "anylearn_sdk.wire",
    "MetricSeries": "anylearn_sdk.wire",
    "login": "anylearn_sdk.session",
}

__all__ = [
    "__version__",
    "log_metrics",
    "log_params",
    "set_tags",
    "Algorithm",
    "AnylearnError",
    "Dataset",
    "Mirror",
    "Model",
    "NewTokenSecret",
    "Preview",
    "Project",
    "QuotaGroup",
    "RequiredLocalCommitError",
    "ResourceState",
    "TaskFailedError",
    "TaskRecord",
    "ExperimentRecord",
    "MetricSeries",
    "TaskState",
    "TaskSummary",
    "Token",
    "TrainTask",
    "User",
    "add_mirror",
    "add_quota_group",
    "add_user",
    "create_token",
    "delete_dataset",
    "delete_model",
    "follow_train_tasks",
    "init_sdk",
    "list_datasets",
    "list_mirrors",
    "list_models",
    "list_quota_groups",
    "list_tokens",
    "list_train_tasks",
    "list_users",
    "login",
    "newest_train_task",
    "preview_dataset",
    "quick_train",
    "remove_quota_group",
    "remove_user",
    "resolve_task_id",
    "resume_unfinished_local_train_tasks",
    "revoke_token",
    "set_mirror",
    "set_quota_group",
    "sync_dataset",
    "sync_model",
    "whoami",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anylearn_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from anylearn_sdk.errors import AnylearnError, RequiredLocalCommitError, TaskFailedError
    from anylearn_sdk.quickstart import quick_train, resume_unfinished_local_train_tasks
    from anylearn_sdk.resources import (
        Algorithm,
        Dataset,
        Mirror,
        Model,
        NewTokenSecret,
        Project,
        QuotaGroup,
        Token,
        TrainTask,
        User,
        add_mirror,
        add_quota_group,
        add_user,
        create_token,
        delete_dataset,
        delete_model,
        follow_train_tasks,
        list_datasets,
        list_mirrors,
        list_models,
        list_quota_groups,
        list_tokens,
        list_train_tasks,
        list_users,
        newest_train_task,
        remove_quota_group,
        remove_user,
        resolve_task_id,
        revoke_token,
        set_mirror,
        set_quota_group,
        whoami,
    )
    from anylearn_sdk.session import init_sdk, login
    from anylearn_sdk.states import ResourceState, TaskState
    from anylearn_sdk.sync import Preview, preview_dataset, sync_dataset, sync_model
    from anylearn_sdk.tracking import log_metrics, log_params, set_tags
    from anylearn_sdk.wire import ExperimentRecord, MetricSeries, TaskRecord, TaskSummary
