"""How fast a task starts: from ``quick_train`` returning to RUNNING and to its first log line,
on the local executor, on the Ray executor (a two-node cluster on this machine), and for
``ray job submit`` of the same script on the same cluster as the reference, in one run.

    sudo .venv/bin/python scripts/bench_launch.py [--runs 5]

Ray binds the host's address, so the script re-runs itself inside a network namespace that has
only loopback (``unshare -n``, which needs root). Every figure is the median of ``--runs``
launches of a script that prints one line and sleeps a second; the clocks are read by polling
the APIs every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "import time\nprint('first line', flush=True)\ntime.sleep(1)\n"
POLL = 0.02


def loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def start_backend(data_dir: Path, *options: str) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "anylearn_sdk.server", "--data-dir", str(data_dir), *options],
        stderr=subprocess.DEVNULL,
    )
    address = data_dir / "server.json"
    while not address.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the backend {options} did not start")
        time.sleep(0.05)
    url = json.loads(address.read_text())["url"]
    token = json.loads((data_dir / "admin-credentials.json").read_text())["token"]
    return proc, url, token


def time_anylearn(url: str, token: str, algo: Path, runs: int) -> tuple[float, float]:
    from anylearn_sdk import TaskState, init_sdk, quick_train

    init_sdk(url, token=token)
    running, first = [], []
    for _ in range(runs + 1):  # the first run warms up (environment, caches)
        task = quick_train(algorithm_dir=algo, entrypoint="python tick.py", progress=False)[0]
        start = time.perf_counter()
        t_running = t_first = None
        while t_running is None or t_first is None:
            now = time.perf_counter() - start
            if t_running is None and task.refresh().state != TaskState.QUEUED:
                t_running = now
            if t_first is None and "first line" in task.logs()[0]:
                t_first = now
            time.sleep(POLL)
        task.wait(timeout=120, poll_interval=0.1)
        running.append(t_running)
        first.append(t_first)
    return statistics.median(running[1:]), statistics.median(first[1:])


def time_ray_job(dashboard: str, algo: Path, runs: int) -> tuple[float, float]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    running, first = [], []
    for _ in range(runs + 1):
        job = client.submit_job(entrypoint="python tick.py", runtime_env={"working_dir": str(algo)})
        start = time.perf_counter()
        t_running = t_first = None
        while t_running is None or t_first is None:
            now = time.perf_counter() - start
            if t_running is None and client.get_job_status(job) != JobStatus.PENDING:
                t_running = now
            if t_first is None and "first line" in client.get_job_logs(job):
                t_first = now
            time.sleep(POLL)
        while not client.get_job_status(job).is_terminal():
            time.sleep(0.1)
        running.append(t_running)
        first.append(t_first)
    return statistics.median(running[1:]), statistics.median(first[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not loopback_only():
        if os.geteuid() != 0:
            raise SystemExit("run as root: the benchmark makes a loopback-only network namespace")
        inner = f"ip link set lo up && exec {sys.executable} {' '.join(sys.argv)}"
        raise SystemExit(subprocess.call(["unshare", "--net", "sh", "-c", inner], cwd=ROOT))

    from ray.cluster_utils import Cluster

    os.environ.setdefault("ANYLEARN_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="anylearn-bench-launch-"))
    os.environ["ANYLEARN_HOME"] = str(work / "home")
    algo = work / "algo"
    algo.mkdir()
    (algo / "tick.py").write_text(SCRIPT)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    backends = []
    try:
        local = start_backend(work / "local")
        backends.append(local[0])
        ray_backend = start_backend(
            work / "ray", "--executor", "ray", "--ray-address", cluster.address,
            "--ray-node-cache", str(work / "node-cache"),
        )  # fmt: skip
        backends.append(ray_backend[0])
        rows = {
            "local executor": time_anylearn(local[1], local[2], algo, args.runs),
            "ray executor": time_anylearn(ray_backend[1], ray_backend[2], algo, args.runs),
            "ray job submit": time_ray_job(
                f"http://{cluster.head_node.address_info['webui_url']}", algo, args.runs
            ),
        }
    finally:
        for proc in backends:
            proc.terminate()
            proc.wait(timeout=30)
        cluster.shutdown()
    print(f"launch latency, median of {args.runs} runs after one warm-up (seconds)")
    print(f"{'':16} {'to RUNNING':>11} {'to first line':>14}")
    for name, (to_running, to_first) in rows.items():
        print(f"{name:16} {to_running:11.2f} {to_first:14.2f}")
    reference = rows["ray job submit"][1]
    ratio = rows["ray executor"][1] / reference
    print(f"ray executor / ray job submit, to first line: {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
