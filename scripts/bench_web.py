"""Benchmark: the web page's task list, first page, over 1000 tasks.

    python scripts/bench_web.py [--tasks 1000] [--loads 30]

Starts a backend of its own in a temporary folder and creates the tasks as
``scripts/bench_watch.py`` does (some finished with a log, one running, the rest waiting),
signs in to the web page with the admin's token, and loads ``/tasks`` (its first page, 50
rows, newest first: one count, one page of rows, each started task's last log line) and the
htmx refresh of its rows (``/tasks/rows``) repeatedly. It prints the median and 95th
percentile of the server's own time from the ``Server-Timing`` header (target: the page under
200 ms), next to a reference measured in the same run: the same 50 rows read straight from
the SQLite file with the standard library, plus the last line of each log.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import requests
from bench_watch import bench_backend, reference_ms

TARGET_MS = 200.0
PAGE_ROWS = 50


def server_ms(response: requests.Response) -> float:
    response.raise_for_status()
    return float(response.headers["Server-Timing"].split("dur=")[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=30)
    args = parser.parse_args()
    with bench_backend("anylearn-bench-web-", args.tasks) as (url, token, work):
        with requests.Session() as web:
            web.post(f"{url}/signin", data={"token": token}, timeout=30).raise_for_status()
            page, rows, reference = [], [], []
            for _ in range(args.loads):
                response = web.get(f"{url}/tasks", timeout=30)
                page.append(server_ms(response))
                rows.append(server_ms(web.get(f"{url}/tasks/rows", timeout=30)))
                reference.append(reference_ms(work / "data", PAGE_ROWS))
                time.sleep(0.05)
    shown = response.text.count('<tr class="state-')
    print(f"the first page lists {shown} of {args.tasks} tasks")

    def p95(values: list[float]) -> float:
        return sorted(values)[max(0, int(len(values) * 0.95) - 1)]

    median, ref = statistics.median(page), statistics.median(reference)
    verdict = "OK" if p95(page) < TARGET_MS else "MISSED"
    print(
        f"/tasks server time: median {median:.1f} ms, p95 {p95(page):.1f} ms "
        f"(target < {TARGET_MS:.0f} ms) {verdict}"
    )
    print(f"/tasks/rows (the 2 s refresh): median {statistics.median(rows):.1f} ms")
    print(
        f"reference (sqlite3 + log tails, same {PAGE_ROWS} rows): median {ref:.1f} ms; "
        f"page / reference = {median / ref:.2f}"
    )
    return 0 if verdict == "OK" and shown == PAGE_ROWS else 1


if __name__ == "__main__":
    sys.exit(main())
