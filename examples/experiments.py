"""Experiment records: two runs of the bundled example, compared, reused and exported.

    python examples/experiments.py [--mlflow-uri sqlite:///mlflow.db]

Runs the logistic regression at two learning rates, prints the rows that differ between the
two records, asks for the first run again with ``reuse="succeeded"`` (it comes back without
running), and, when mlflow is installed and ``--mlflow-uri`` is given, exports both runs.
Talks to the same backend as ``examples/quickstart.py`` (the local one unless configured).
"""

import argparse
import sys
from pathlib import Path

from anylearn_sdk import quick_train
from anylearn_sdk.compare import compare

HERE = Path(__file__).resolve().parent


def run(lr: float, reuse: str = "run"):
    task = quick_train(
        algorithm_dir=HERE / "logistic_regression",
        dataset_dir=HERE / "data",
        entrypoint="python train.py",
        hyperparams={"epochs": 100, "lr": lr},
        resource_polling=0.5,
        progress=False,
        reuse=reuse,
    )[0]
    task.wait(timeout=600, poll_interval=0.5, raise_on_failure=True)
    return task


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mlflow-uri", help="export both runs to this MLflow tracking URI")
    args = parser.parse_args()
    fast, slow = run(0.5), run(0.05)
    record = fast.record()
    loss = record.results.metrics["loss"]
    print(f"{fast.id}: commit {record.code.commit[:12]}, {len(loss.values)} loss points, "
          f"last {loss.last:.4f}; {len(record.environment.packages)} packages")  # fmt: skip
    for row in compare([record, slow.record()]):
        if row.differs:
            print(f"differs: {row.section:<10} {row.name:<22} {' | '.join(row.values)}")
    again = run(0.5, reuse="succeeded")
    print(f"reuse='succeeded' gave {again.id} (the first run: {again.id == fast.id})")
    if args.mlflow_uri:
        for task in (fast, slow):
            # The bundled example is a folder without git, so its code is a snapshot.
            run_id = task.export_mlflow(tracking_uri=args.mlflow_uri, allow_dirty=True)
            print(f"{task.id} -> MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
