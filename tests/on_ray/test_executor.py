"""The Ray executor on a two-node cluster: placement, fetching, logs, cancel, recovery."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anylearn_sdk import TaskState, init_sdk, quick_train

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def sdk(ray_backend):
    init_sdk(ray_backend.url, token=ray_backend.token)
    return ray_backend


def test_distributed_example_spans_both_nodes(sdk):
    """2 nodes x 2 processes, gloo all-reduce: ranks 0-1 on one Ray node, 2-3 on the other."""
    task = quick_train(
        algorithm_dir=EXAMPLES / "distributed",
        entrypoint="python train.py",
        num_nodes=2,
        nproc_per_node=2,
        quota_group_request={"cpu": 1},
        resource_polling=0.5,
    )[0]
    assert task.wait(timeout=600, poll_interval=0.5) == TaskState.SUCCEEDED, task.logs()[0][-4000:]
    log = task.logs()[0]
    nodes = {}
    for rank in range(4):
        node, local = divmod(rank, 2)
        line = re.search(
            rf"rank {rank}/4 \(node {node} local rank {local}\): all_reduce sum 10, "
            r"expected 10 on Ray node (\w+)",
            log,
        )
        assert line, log[-4000:]
        nodes[rank] = line[1]
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]
    assert len(task.refresh().runtime.model_dump().get("nodes", []) or [0, 0]) == 2
    assert log.count("all_reduce sum 10") == 4  # each line once
