"""anylearn_sdk: send training jobs from a laptop to a cluster.

One call, :func:`quick_train`, pins a local code folder to a git commit, deduplicates and
uploads a local data folder by content, and creates a training task on a backend: the one
named by :func:`init_sdk`, ``ANYLEARN_HOST`` or ``anylearn login``, or else the embedded local
backend the SDK starts on 127.0.0.1.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from anylearn_sdk.errors import AnylearnError, RequiredLocalCommitError  # noqa: E402
from anylearn_sdk.quickstart import quick_train, resume_unfinished_local_train_tasks  # noqa: E402
from anylearn_sdk.resources import (  # noqa: E402
    Algorithm,
    Dataset,
    Mirror,
    Model,
    Project,
    QuotaGroup,
    TrainTask,
)
from anylearn_sdk.session import init_sdk  # noqa: E402
from anylearn_sdk.states import ResourceState, TaskState  # noqa: E402
from anylearn_sdk.sync import Preview, preview_dataset, sync_dataset, sync_model  # noqa: E402

__all__ = [
    "Algorithm",
    "AnylearnError",
    "Dataset",
    "Mirror",
    "Model",
    "Preview",
    "Project",
    "QuotaGroup",
    "RequiredLocalCommitError",
    "ResourceState",
    "TaskState",
    "TrainTask",
    "__version__",
    "init_sdk",
    "preview_dataset",
    "quick_train",
    "resume_unfinished_local_train_tasks",
    "sync_dataset",
    "sync_model",
]
