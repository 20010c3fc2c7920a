"""Distributed example: a torch.distributed all-reduce over gloo on 2 nodes x 2 processes.

    python examples/distributed.py

The algorithm folder carries a ``requirements.txt`` (``torch==2.13.0``): the server builds a
virtual environment for it once (about a minute here), and every later task with the same
requirements reuses it. On the local executor both "nodes" are local processes; every rank
gets torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).
"""

import json
import sys
from pathlib import Path

from anylearn_sdk import quick_train

HERE = Path(__file__).resolve().parent


def main() -> int:
    task, algorithm, _, _ = quick_train(
        algorithm_dir=HERE / "distributed",
        entrypoint="python train.py",
        num_nodes=2,
        nproc_per_node=2,
        resource_polling=1.0,
    )
    print(f"task {task.id}: algorithm {algorithm.name}@{algorithm.commit[:12]}, 4 ranks")
    for text in task.stream_logs():
        print(text, end="")
    state = task.wait(timeout=1800, poll_interval=1.0)
    print(f"task {task.id} finished: {state.value}")
    if state.value != "SUCCEEDED":
        return 1
    results = task.download_results(HERE / "results" / task.id)
    print(json.loads((results / "result.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
