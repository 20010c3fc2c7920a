"""Quickstart: train the bundled logistic regression on the bundled CSV.

    python examples/quickstart.py

With nothing configured, the SDK starts the local backend on 127.0.0.1 (data under
``~/.anylearn``, or ``$ANYLEARN_HOME``). Run it twice: the second run uploads 0 bytes and
pushes no commit.
"""

import json
import sys
from pathlib import Path

from anylearn_sdk import quick_train

HERE = Path(__file__).resolve().parent


def main() -> int:
    task, algorithm, datasets, project = quick_train(
        algorithm_dir=HERE / "logistic_regression",
        dataset_dir=HERE / "data",
        entrypoint="python train.py",
        output="output",
        hyperparams={"epochs": 300, "lr": 0.5},
        resource_polling=1.0,
    )
    print(
        f"task {task.id}: algorithm {algorithm.name}@{algorithm.commit[:12]}, "
        f"dataset {datasets[0].id} (uploaded {datasets[0].uploaded_bytes} bytes), "
        f"project {project.name}"
    )
    for text in task.stream_logs():
        print(text, end="")
    state = task.wait(timeout=600, poll_interval=1.0)
    print(f"task {task.id} finished: {state.value}")
    if state.value != "SUCCEEDED":
        print(f"why: {task.error}")
        return 1
    results = task.download_results(HERE / "results" / task.id)
    metrics = json.loads((results / "metrics.json").read_text())
    print(f"results in {results}: accuracy {metrics['accuracy']:.3f}")
    loss = task.record().results.metrics["loss"]
    print(
        f"loss over {len(loss.values)} epochs: {loss.max:.3f} to {loss.last:.3f}; "
        f"draw it with: anylearn tasks metrics {task.id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
