"""The Ray executor on a two-node cluster: placement, fetching, logs, cancel, recovery."""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil
import pytest

from anylearn_sdk import TaskState, add_quota_group, init_sdk, quick_train
from anylearn_sdk.errors import BadRequestError
from tests.on_ray.conftest import RayBackend

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
    assert task.refresh().runtime.nodes == [nodes[0], nodes[2]]
    assert log.count("all_reduce sum 10") == 4  # each line once
    # Each node's tracking file was pulled; the record keeps the lowest rank's series.
    metrics = task.record().results.metrics
    assert metrics["all_reduce_sum"].values == [10.0] and metrics["rank"].values == [0.0]
    copies = sorted(p.name for p in (sdk.data_dir / "tasks" / task.id / ".anylearn").iterdir())
    assert {"tracking-node0.jsonl", "tracking-node1.jsonl"} <= set(copies), copies


#: Prints a line every 0.1 s, ``--lines`` of them, or until ``--until`` exists; says its pid.
TICKER = """
import argparse, os, pathlib, time
p = argparse.ArgumentParser()
p.add_argument("--lines", type=int, default=10**9)
p.add_argument("--until", default="")
a = p.parse_args()
rank = os.environ["RANK"]
out = pathlib.Path(os.environ["ANYLEARN_OUTPUT_DIR"])
progress = out / f"progress-{rank}.txt"  # a checkpoint: the last line printed
first = 0
if progress.exists():
    first = int(progress.read_text()) + 1
    print(f"rank {rank} resuming after line {first - 1}", flush=True)
print(f"pid {os.getpid()} rank {rank} attempt {os.environ['ANYLEARN_ATTEMPT']}", flush=True)
for i in range(first, a.lines):
    if a.until and pathlib.Path(a.until).exists():
        break
    print(f"rank {rank} line {i}", flush=True)
    progress.write_text(str(i))
    time.sleep(0.1)
if rank == "0":
    (out / "done.txt").write_text("ok")
"""


def ticker(tmp_path: Path) -> Path:
    folder = tmp_path / "ticker"
    folder.mkdir(exist_ok=True)
    (folder / "tick.py").write_text(TICKER)
    return folder


@pytest.fixture(scope="module")
def big_group(ray_backend):
    """A quota group larger than the cluster, so the cluster is what limits."""
    init_sdk(ray_backend.url, token=ray_backend.token)
    add_quota_group("cluster", capacity={"cpu": 64})
    return "cluster"


def test_a_dataset_reaches_new_nodes_verified_and_then_is_cached(sdk, tmp_path, big_group):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(200):
        (data / f"f{i:03}.txt").write_text(f"file {i}\n" * (i + 1))
    script = "import os; print(len(os.listdir(os.environ['ANYLEARN_DATASET_DIR'])), 'files')\n"
    (tmp_path / "count").mkdir()
    (tmp_path / "count" / "count.py").write_text(script)
    common = dict(
        algorithm_dir=tmp_path / "count",
        dataset_dir=data,
        entrypoint="python count.py",
        num_nodes=2,
        quota_group_name=big_group,
        quota_group_request={"cpu": 1},
    )
    first = quick_train(**common)[0]
    assert first.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED, first.logs()[0]
    log = first.logs()[0]
    for node in (0, 1):
        assert re.search(rf"node {node}: fetched 200 objects \(\d+ bytes\)", log), log
    assert log.count("200 files") == 2
    second = quick_train(**common)[0]
    assert second.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED
    log = second.logs()[0]
    for node in (0, 1):
        assert f"node {node}: fetched 0 objects (0 bytes)" in log, log
    caches = [p for p in sdk.cache.iterdir() if p.is_dir()]
    assert len(caches) == 2  # one per node, each with its own copy


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cancel_leaves_no_rank_actor_or_placement_group(sdk, tmp_path, big_group, driver):
    from ray.util.state import list_actors, list_placement_groups

    task = quick_train(
        algorithm_dir=ticker(tmp_path),
        entrypoint="python tick.py",
        num_nodes=2,
        nproc_per_node=2,
        quota_group_name=big_group,
        quota_group_request={"cpu": 1},
    )[0]
    log = wait_for(task, lambda text: text.count("line 3") == 4)
    pids = [int(p) for p in re.findall(r"pid (\d+) rank", log)]
    assert len(pids) == 4
    task.cancel()
    assert task.refresh().state == TaskState.CANCELLED
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)]
        actors = [
            a for a in list_actors(filters=[("state", "=", "ALIVE")]) if task.id in (a.name or "")
        ]
        groups = [
            g for g in list_placement_groups() if task.id in (g.name or "") and g.state != "REMOVED"
        ]
        if not (alive or actors or groups):
            break
        time.sleep(0.5)
    assert (alive, actors, groups) == ([], [], [])


def test_a_task_waits_for_room_and_one_too_big_is_refused(sdk, tmp_path, big_group):
    release = tmp_path / "release"
    common = dict(
        algorithm_dir=ticker(tmp_path),
        num_nodes=2,
        quota_group_name=big_group,
        quota_group_request={"cpu": 2},  # each node's every CPU
    )
    first = quick_train(entrypoint=f"python tick.py --until {release}", **common)[0]
    wait_for(first, lambda text: "line 2" in text)
    second = quick_train(entrypoint="python tick.py --lines 3", **common)[0]
    time.sleep(3)
    assert second.refresh().state == TaskState.QUEUED  # its placement group waits
    release.touch()
    assert first.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    assert second.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    with pytest.raises(BadRequestError, match=r"never be placed: 3 node\(s\) of CPU=2 each"):
        quick_train(entrypoint="python tick.py", **{**common, "num_nodes": 3})


def test_a_killed_backend_comes_back_and_the_task_finishes_whole(sdk, tmp_path, big_group):
    task = quick_train(
        algorithm_dir=ticker(tmp_path),
        entrypoint="python tick.py --lines 60",
        num_nodes=2,
        quota_group_name=big_group,
        quota_group_request={"cpu": 1},
    )[0]
    wait_for(task, lambda text: "rank 1 line 10" in text)
    sdk.kill()  # SIGKILL, mid-task
    time.sleep(1)
    sdk.start()
    init_sdk(sdk.url, token=sdk.token)
    assert task.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED, task.logs()[0]
    assert task.refresh().attempt == 1
    log = task.logs()[0]
    for rank in (0, 1):
        for i in range(60):
            assert log.count(f"rank {rank} line {i}\n") == 1, (rank, i, log)
    assert (sdk.data_dir / "tasks" / task.id / "code" / "output" / "done.txt").read_text() == "ok"


def wait_for(task, done, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = task.logs()[0]
        if done(log):
            return log
        assert not task.refresh().state.is_terminal, log
        time.sleep(0.2)
    raise AssertionError(task.logs()[0])


def test_nodes_sharing_the_data_folder_fetch_nothing(cluster, tmp_path):
    """With ``--ray-shared-data`` the nodes read code and objects from the backend's folder."""
    data_dir = tmp_path / "data"
    shared = RayBackend(
        data_dir, tmp_path / "cache", cluster.address, "--ray-shared-data", str(data_dir)
    ).start()
    try:
        init_sdk(shared.url, token=shared.token)
        data = tmp_path / "files"
        data.mkdir()
        for i in range(5):
            (data / f"f{i}.txt").write_text(f"file {i}\n")
        (tmp_path / "count").mkdir()
        (tmp_path / "count" / "count.py").write_text(
            "import os; print(len(os.listdir(os.environ['ANYLEARN_DATASET_DIR'])), 'files')\n"
        )
        task = quick_train(
            algorithm_dir=tmp_path / "count", dataset_dir=data, entrypoint="python count.py"
        )[0]
        assert task.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED, task.logs()[0]
        log = task.logs()[0]
        assert "5 files" in log and "node 0: fetched 0 objects (0 bytes)" in log
        (cache,) = [p for p in (tmp_path / "cache").iterdir()]
        assert not (cache / "objects").exists() and not (cache / "repos").exists()
    finally:
        shared.stop()


def test_a_quota_group_tied_to_labelled_nodes_runs_only_there(sdk, tmp_path, cluster):
    """The worker node carries ``anylearn.io/quota-group=worker-only`` (``ray start
    --labels``): that group's tasks run there, and two nodes of it cannot be had."""
    add_quota_group("worker-only", capacity={"cpu": 8})
    (worker,) = [n.node_id for n in cluster.worker_nodes]
    common = dict(
        algorithm_dir=ticker(tmp_path),
        entrypoint="python tick.py --lines 2",
        quota_group_name="worker-only",
        quota_group_request={"cpu": 1},
    )
    for _ in range(2):
        task = quick_train(**common)[0]
        assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
        assert task.refresh().runtime.nodes == [worker]
    with pytest.raises(BadRequestError, match="labelled anylearn.io/quota-group=worker-only"):
        quick_train(num_nodes=2, **common)


def test_a_dead_node_makes_the_task_run_again_and_leaves_nothing(sdk, tmp_path, big_group, cluster):
    """Runs last: it removes a node (a third one joins first, so two remain)."""
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    task = quick_train(
        algorithm_dir=ticker(tmp_path),
        entrypoint="python tick.py --lines 40",
        num_nodes=2,
        quota_group_name=big_group,
        quota_group_request={"cpu": 1},
    )[0]
    log = wait_for(task, lambda text: "rank 1 line 15" in text)  # output synced since
    first = [int(p) for p in re.findall(r"pid (\d+) rank \d attempt 1", log)]
    assert len(first) == 2
    used = set(task.refresh().runtime.nodes)
    head = cluster.head_node.node_id
    victim = next(n for n in cluster.worker_nodes if n.node_id in used and n.node_id != head)
    cluster.remove_node(victim, allow_graceful=False)
    assert task.wait(timeout=180, poll_interval=0.2) == TaskState.SUCCEEDED, task.logs()[0]
    assert task.refresh().attempt == 2
    log = task.logs()[0]
    assert "attempt 1 lost its processes" in log
    assert "rank 1 line 39\n" in log, log  # from whichever attempt printed it
    # Each attempt's lines are pulled once: attempt 2 resumed after line 5 or later, so line 5
    # is attempt 1's alone, even where attempt 2 ran on attempt 1's node.
    assert log.count("rank 0 line 5\n") == 1
    # Node 0's output went back to the backend every second; attempt 2 started from it.
    resumed = re.search(r"rank 0 resuming after line (\d+)", log)
    assert resumed and int(resumed[1]) >= 5, log
    assert [p for p in first if running(p)] == []  # nothing of attempt 1 is left on any node
