"""Benchmark: one refresh of ``anylearn tasks --watch`` over 1000 tasks.

    python scripts/bench_watch.py [--tasks 1000] [--refreshes 30]

Starts a backend of its own in a temporary folder, creates the tasks (one quick_train, then
plain API calls with the same commit) in a quota group of one CPU, so while it measures some
tasks have finished with a log, one runs and the rest wait. Then it calls the CLI's own
refresh (``list_train_tasks``) repeatedly and reads the server's share of each from the
``Server-Timing`` header. It counts the HTTP requests each refresh sends (target: 1) and
prints the median and 95th percentile of server time (target: under 100 ms), next to a
reference measured in the same run: the same rows read straight from the SQLite file with
the standard library, plus the last line of each log, which is the least any server must do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from anylearn_sdk import init_sdk, list_train_tasks, quick_train
from anylearn_sdk.server.api.tasks import last_line
from anylearn_sdk.session import get_context

TARGET_MS = 100.0
JOB = textwrap.dedent("""
    import sys
    for step in range(3):
        print(f"step {step} loss {1 / (step + 1):.4f}", flush=True)
""")


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "anylearn_sdk.server", "--data-dir", str(data_dir)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        address = data_dir / "server.json"
        if address.exists() and json.loads(address.read_text())["pid"] == proc.pid:
            url = json.loads(address.read_text())["url"]
            token = json.loads((data_dir / "admin-credentials.json").read_text())["token"]
            return proc, url, token
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


def create_tasks(url: str, token: str, count: int, work: Path) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    requests.post(
        f"{url}/api/v1/quota-groups",
        json={"name": "bench", "capacity": {"cpu": 1}},
        headers=headers,
        timeout=30,
    ).raise_for_status()
    algo = work / "algo"
    algo.mkdir()
    (algo / "job.py").write_text(JOB)
    first = quick_train(
        algorithm_dir=algo, entrypoint="python job.py", quota_group_name="bench", progress=False
    )[0]
    body = {
        key: getattr(first.info, key)
        for key in ("algorithm_id", "commit", "entrypoint", "mirror_id", "quota_group_id")
    }
    with requests.Session() as session:
        session.headers.update(headers)
        for i in range(1, count):
            session.post(
                f"{url}/api/v1/train-tasks", json={**body, "name": f"job-{i}"}, timeout=30
            ).raise_for_status()


def reference_ms(data_dir: Path, limit: int) -> float:
    """The same rows straight from SQLite with the standard library, plus each log's tail."""
    start = time.perf_counter()
    db = sqlite3.connect(data_dir / "anylearn-server.db")
    rows = db.execute(
        "SELECT t.id, t.name, t.state, g.name, t.attempt, t.exit_code, t.error, t.created_at, "
        "t.started_at, t.finished_at FROM train_tasks t JOIN quota_groups g "
        "ON g.id = t.quota_group_id ORDER BY t.created_at DESC LIMIT ?",
        (limit,),
    ).fetchall()
    for row in rows:
        last_line(data_dir / "tasks" / row[0] / "task.log")
    db.close()
    return (time.perf_counter() - start) * 1000


@contextmanager
def bench_backend(prefix: str, count: int) -> Iterator[tuple[str, str, Path]]:
    """A backend of its own in a temporary folder, holding ``count`` tasks (see
    :func:`create_tasks`), the SDK connected as its admin: yields (url, admin token, work
    folder). The folder is removed afterwards unless ``ANYLEARN_BENCH_KEEP`` is set."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["ANYLEARN_HOME"] = str(work / "home")
    server, url, token = start_server(work / "data")
    try:
        init_sdk(url, token=token)
        started = time.perf_counter()
        create_tasks(url, token, count, work)
        print(f"created {count} tasks in {time.perf_counter() - started:.1f} s")
        yield url, token, work
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not os.environ.get("ANYLEARN_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--refreshes", type=int, default=30)
    args = parser.parse_args()
    with bench_backend("anylearn-bench-watch-", args.tasks) as (_url, _token, work):
        session = get_context().api.session
        timings: list[float] = []  # Server-Timing of every response, in ms
        session.hooks["response"].append(
            lambda r, *a, **k: timings.append(float(r.headers["Server-Timing"].split("dur=")[1]))
        )
        server_ms, round_trip_ms, requests_per_refresh, reference = [], [], [], []
        for _ in range(args.refreshes):
            before = len(timings)
            t0 = time.perf_counter()
            rows = list_train_tasks(limit=args.tasks)
            round_trip_ms.append((time.perf_counter() - t0) * 1000)
            requests_per_refresh.append(len(timings) - before)
            server_ms.append(sum(timings[before:]))
            reference.append(reference_ms(work / "data", args.tasks))
            time.sleep(0.1)
        states: dict[str, int] = {}
        for row in rows:
            states[row.state.value] = states.get(row.state.value, 0) + 1
        with_log = sum(1 for row in rows if row.last_line)
        print(f"last refresh: {len(rows)} rows, {with_log} with a log line, states {states}")

        def p95(values: list[float]) -> float:
            return sorted(values)[max(0, int(len(values) * 0.95) - 1)]

        median, ref = statistics.median(server_ms), statistics.median(reference)
        print(f"requests per refresh: {sorted(set(requests_per_refresh))} (target: [1])")
        print(
            f"server time per refresh: median {median:.1f} ms, p95 {p95(server_ms):.1f} ms "
            f"(target < {TARGET_MS:.0f} ms) {'OK' if p95(server_ms) < TARGET_MS else 'MISSED'}"
        )
        print(f"round trip per refresh: median {statistics.median(round_trip_ms):.1f} ms")
        print(
            f"reference (sqlite3 + log tails, same rows): median {ref:.1f} ms; "
            f"server / reference = {median / ref:.2f}"
        )
        ok = requests_per_refresh == [1] * args.refreshes and p95(server_ms) < TARGET_MS
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
