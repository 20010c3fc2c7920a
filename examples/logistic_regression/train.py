"""Logistic regression by batch gradient descent, in plain Python.

Reads every ``*.csv`` in the dataset folder (columns ``x1,x2,...,label``), trains, and writes
``model.json`` (weights and bias) and ``metrics.json`` (loss and accuracy) to the output folder.

    python train.py --dataset DIR [--output DIR] [--epochs 300] [--lr 0.5]

``--dataset`` defaults to ``$ANYLEARN_DATASET_DIR`` and ``--output`` to ``$ANYLEARN_OUTPUT_DIR``,
the variables the anylearn backend sets. Loss and accuracy are logged every epoch with
``log_metrics`` (``anylearn tasks metrics TASK`` draws them); run outside a task, they go to
``anylearn-runs/`` here, and without anylearn_sdk installed they are only printed.
"""

import argparse
import csv
import json
import math
import os
from pathlib import Path

try:
    from anylearn_sdk import log_metrics, log_params
except ImportError:  # anylearn_sdk not installed: the script still trains

    def log_metrics(metrics, step=None):
        pass

    def log_params(params):
        pass


def load(folder: Path):
    rows = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                label = float(row.pop("label"))
                rows.append(([float(v) for v in row.values()], label))
    if not rows:
        raise SystemExit(f"no rows found in {folder}/*.csv")
    return rows


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def train(rows, epochs: int, lr: float):
    n_features = len(rows[0][0])
    weights, bias = [0.0] * n_features, 0.0
    for epoch in range(1, epochs + 1):
        grad_w, grad_b, loss, correct = [0.0] * n_features, 0.0, 0.0, 0
        for x, y in rows:
            p = sigmoid(sum(w * v for w, v in zip(weights, x, strict=True)) + bias)
            loss -= y * math.log(max(p, 1e-12)) + (1 - y) * math.log(max(1 - p, 1e-12))
            correct += (p >= 0.5) == (y == 1.0)
            for i, v in enumerate(x):
                grad_w[i] += (p - y) * v
            grad_b += p - y
        n = len(rows)
        weights = [w - lr * g / n for w, g in zip(weights, grad_w, strict=True)]
        bias -= lr * grad_b / n
        log_metrics({"loss": loss / n, "accuracy": correct / n}, step=epoch)
        if epoch % max(1, epochs // 5) == 0:
            print(f"epoch {epoch:4d}  loss {loss / n:.4f}  accuracy {correct / n:.3f}", flush=True)
    return weights, bias, loss / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default=os.environ.get("ANYLEARN_DATASET_DIR"))
    parser.add_argument("--output", default=os.environ.get("ANYLEARN_OUTPUT_DIR", "output"))
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args()
    if not args.dataset:
        raise SystemExit("--dataset is required (or set ANYLEARN_DATASET_DIR)")
    rows = load(Path(args.dataset))
    log_params({"rows": len(rows), "features": len(rows[0][0])})
    print(f"training on {len(rows)} rows from {args.dataset}", flush=True)
    weights, bias, loss = train(rows, args.epochs, args.lr)
    correct = sum(
        (sigmoid(sum(w * v for w, v in zip(weights, x, strict=True)) + bias) >= 0.5) == (y == 1.0)
        for x, y in rows
    )
    metrics = {"loss": round(loss, 6), "accuracy": correct / len(rows), "rows": len(rows)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps({"weights": weights, "bias": bias}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"accuracy {metrics['accuracy']:.3f}; wrote {out}/model.json and metrics.json", flush=True
    )


if __name__ == "__main__":
    main()
