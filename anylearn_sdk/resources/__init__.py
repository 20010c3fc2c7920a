"""Client-side views of the backend's resources."""

from anylearn_sdk.resources.algorithm import Algorithm
from anylearn_sdk.resources.dataset import Dataset, Model
from anylearn_sdk.resources.project import Project
from anylearn_sdk.resources.runtime import Mirror, QuotaGroup
from anylearn_sdk.resources.train_task import TrainTask

__all__ = ["Algorithm", "Dataset", "Mirror", "Model", "Project", "QuotaGroup", "TrainTask"]
