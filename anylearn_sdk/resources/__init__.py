"""Client-side views of the backend's resources, and the calls that list and manage them."""

from anylearn_sdk.resources.accounts import (
    NewTokenSecret,
    Token,
    User,
    add_user,
    create_token,
    list_tokens,
    list_users,
    remove_user,
    revoke_token,
    whoami,
)
from anylearn_sdk.resources.algorithm import Algorithm
from anylearn_sdk.resources.dataset import (
    Dataset,
    Model,
    delete_dataset,
    delete_model,
    list_datasets,
    list_models,
)
from anylearn_sdk.resources.project import Project
from anylearn_sdk.resources.runtime import (
    Mirror,
    QuotaGroup,
    add_mirror,
    add_quota_group,
    list_mirrors,
    list_quota_groups,
    remove_quota_group,
    set_mirror,
    set_quota_group,
)
from anylearn_sdk.resources.train_task import (
    TrainTask,
    follow_train_tasks,
    list_train_tasks,
    newest_train_task,
    resolve_task_id,
)

__all__ = [
    "Algorithm",
    "Dataset",
    "Mirror",
    "Model",
    "NewTokenSecret",
    "Project",
    "QuotaGroup",
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
    "list_datasets",
    "list_mirrors",
    "list_models",
    "list_quota_groups",
    "list_tokens",
    "list_train_tasks",
    "list_users",
    "newest_train_task",
    "remove_quota_group",
    "remove_user",
    "resolve_task_id",
    "revoke_token",
    "set_mirror",
    "set_quota_group",
    "whoami",
]
