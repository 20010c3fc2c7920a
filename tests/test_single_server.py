"""One data folder, one server; the local backend keeps its address; starts check first.

These run the real commands (``python -m anylearn_sdk.server``, ``anylearn server ...``,
``anylearn tasks ...``) as subprocesses, as a user would, with the test's own HOME.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from anylearn_sdk import TaskState, init_sdk, quick_train
from anylearn_sdk.datadir import ADDRESS_FILE
from tests.conftest import BadPeer, admin_token, start_server, wait_for_log

pytestmark = pytest.mark.integration
ANYLEARN = str(Path(sys.executable).parent / "anylearn")

#: Prints "step 1..3", a second apart.
STEPS = textwrap.dedent("""
    import time
    for i in range(1, 4):
        print(f"step {i}", flush=True)
        time.sleep(1)
""")


def anylearn(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ANYLEARN, *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )


def code_folder(tmp_path: Path, name: str, script: str) -> Path:
    folder = tmp_path / "algo"
    folder.mkdir()
    (folder / name).write_text(script)
    return folder


def test_a_second_server_on_one_folder_is_refused_and_the_task_runs_once(tmp_path):
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir)
    try:
        init_sdk(url, token=admin_token(data_dir))
        algo = code_folder(tmp_path, "steps.py", STEPS)
        task = quick_train(algorithm_dir=algo, entrypoint="python steps.py", resource_polling=0.2)[
            0
        ]
        wait_for_log(task, "step 1")

        second = subprocess.run(
            [sys.executable, "-m", "anylearn_sdk.server", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {server.pid}" in lines[0] and url in lines[0]
        # The CLI's foreground start says the same, in one line.
        again = anylearn("server", "start", "--data-dir", str(data_dir))
        assert again.returncode == 1 and again.stderr.count("\n") == 1
        assert f"pid {server.pid}" in again.stderr

        assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
        log = task.logs()[0]
        assert [log.count(f"step {i}") for i in (1, 2, 3)] == [1, 1, 1], log
        assert task.attempt == 1 and "lost its processes" not in log

        # status and stop find the server by its lock, even without its address file.
        (data_dir / ADDRESS_FILE).unlink()
        status = anylearn("server", "status", "--data-dir", str(data_dir))
        assert status.returncode == 0 and f"pid {server.pid}" in status.stdout
        stopped = anylearn("server", "stop", "--data-dir", str(data_dir))
        assert stopped.returncode == 0 and f"pid {server.pid}" in stopped.stdout
        assert server.wait(timeout=30) is not None
        status = anylearn("server", "status", "--data-dir", str(data_dir))
        assert status.returncode == 3 and "not running" in status.stdout
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_start_on_a_busy_port_creates_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for detach in ([], ["--detach"]):
            data_dir = tmp_path / f"fresh{len(detach)}"
            started = anylearn(
                "server", "start", "--port", str(port), "--data-dir", str(data_dir), *detach
            )
            assert started.returncode == 1, started.stderr
            assert started.stderr.count("\n") == 1 and started.stderr.startswith("Error: ")
            assert str(port) in started.stderr and "Traceback" not in started.stderr
            assert not data_dir.exists()  # no folder, no database, no admin credentials


#: Prints lines 0-9, waits for the release file, then prints lines 10-19.
COUNTER = textwrap.dedent("""
    import pathlib, sys, time
    release = pathlib.Path(sys.argv[1])
    for i in range(20):
        if i == 10:
            while not release.exists():
                time.sleep(0.05)
        print(f"line {i}", flush=True)
        time.sleep(0.02)
""")


def test_following_survives_a_stop_and_start_of_the_local_backend(tmp_path, isolated_env):
    started = anylearn("server", "start", "--detach")
    assert started.returncode == 0, started.stderr
    data_dir = isolated_env / ".anylearn" / "server"
    first_url = json.loads((data_dir / ADDRESS_FILE).read_text())["url"]
    release = tmp_path / "release"
    algo = code_folder(tmp_path, "count.py", COUNTER)
    followers: list[subprocess.Popen] = []
    blocker = None
    try:
        task = quick_train(  # no host configured: the SDK uses this local backend
            algorithm_dir=algo, entrypoint=f"python count.py {release}", resource_polling=0.2
        )[0]
        for args in (["tasks", "logs", task.id, "-f"], ["tasks", "--watch", "--interval", "0.2"]):
            followers.append(
                subprocess.Popen(
                    [ANYLEARN, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "COLUMNS": "200"},
                )
            )
        wait_for_log(task, "line 9")
        time.sleep(0.5)  # both followers are polling

        # A stop and a start: the port was free, so the backend is where it was.
        assert anylearn("server", "stop").returncode == 0
        assert anylearn("server", "start", "--detach").returncode == 0
        assert json.loads((data_dir / ADDRESS_FILE).read_text())["url"] == first_url

        # Another stop, and the old port taken meanwhile by another program (which hangs up on
        # every connection): the backend moves, and the followers find it by reading the
        # local address again.
        assert anylearn("server", "stop").returncode == 0
        blocker = BadPeer(int(first_url.rsplit(":", 1)[1]), hang_up=True)
        assert anylearn("server", "start", "--detach").returncode == 0
        assert json.loads((data_dir / ADDRESS_FILE).read_text())["url"] != first_url

        release.touch()
        out, err = followers[0].communicate(timeout=180)
        assert followers[0].returncode == 0, err
        printed = [line for line in out.splitlines() if line.startswith("line ")]
        assert printed == [f"line {i}" for i in range(20)]  # every line, exactly once
        watch_out, watch_err = followers[1].communicate(timeout=60)
        assert followers[1].returncode == 0, watch_err
        assert task.id in watch_out and "SUCCEEDED" in watch_out
    finally:
        for proc in followers:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        if blocker is not None:
            blocker.close()
        anylearn("server", "stop")
