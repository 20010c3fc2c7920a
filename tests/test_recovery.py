"""Restart recovery: the server is SIGKILLed while tasks run, then started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from anylearn_sdk import TaskState, init_sdk, quick_train
from tests.conftest import admin_token, git, start_server, wait_for_log
from tests.test_quick_train import processes_of

pytestmark = pytest.mark.integration

#: Task A waits for a file the test creates after the restart; task B checkpoints into its
#: output, then waits to be killed; run again, it resumes from the checkpoint and finishes.
SCRIPT = textwrap.dedent("""
    import os, pathlib, sys, time
    mode, release = sys.argv[1], pathlib.Path(sys.argv[2])
    ckpt = pathlib.Path(os.environ["ANYLEARN_OUTPUT_DIR"]) / "ckpt.txt"
    if mode == "survive":
        print("waiting", flush=True)
        while not release.exists():
            time.sleep(0.05)
        print("released", flush=True)
    elif ckpt.exists():
        print("resumed from checkpoint", ckpt.read_text(), flush=True)
    else:
        ckpt.write_text("1")
        print("checkpoint written", flush=True)
        time.sleep(600)
""")


def test_sigkilled_server_reattaches_and_requeues(tmp_path, dataset_dir):
    repo = tmp_path / "algo"
    repo.mkdir()
    (repo / "job.py").write_text(SCRIPT)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "job", cwd=repo)
    data_dir = tmp_path / "server"
    release = tmp_path / "release"
    server, url = start_server(data_dir)
    try:
        admin = admin_token(data_dir)
        requests.post(
            f"{url}/api/v1/quota-groups",
            json={"name": "pair", "capacity": {"cpu": 2}},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).raise_for_status()
        init_sdk(url, token=admin)
        common = dict(
            algorithm_dir=repo, dataset_dir=dataset_dir, quota_group_name="pair",
            resource_polling=0.2,
        )  # fmt: skip
        survivor = quick_train(entrypoint=f"python job.py survive {release}", **common)[0]
        lost = quick_train(entrypoint=f"python job.py checkpoint {release}", **common)[0]
        wait_for_log(survivor, "waiting")
        wait_for_log(lost, "checkpoint written")

        server.kill()  # SIGKILL: no shutdown code runs
        server.wait()
        for group in {os.getpgid(pid) for pid in processes_of(lost.id)}:  # the second task
            os.killpg(group, signal.SIGKILL)  # dies with it, supervisor included
        assert processes_of(survivor.id), "the first task must outlive the server"

        server, _ = start_server(data_dir, port=int(url.rsplit(":", 1)[1]))  # same address
        release.touch()
        assert survivor.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
        assert lost.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
        survivor.refresh()
        lost.refresh()
        assert survivor.attempt == 1 and survivor.exit_code == 0
        assert lost.attempt == 2 and lost.exit_code == 0
        log = lost.logs()[0]
        assert "attempt 1 lost its processes" in log
        assert "resumed from checkpoint 1" in log
        assert "released" in survivor.logs()[0]
        assert processes_of(survivor.id) == [] and processes_of(lost.id) == []
    finally:
        server.terminate()
        server.wait(timeout=30)


#: Prints lines 0-9, waits for the release file, then prints lines 10-29 and ends.
COUNTER = textwrap.dedent("""
    import pathlib, sys, time
    release = pathlib.Path(sys.argv[1])
    for i in range(30):
        if i == 10:
            while not release.exists():
                time.sleep(0.05)
        print(f"line {i}", flush=True)
        time.sleep(0.02)
""")


def test_logs_follow_survives_a_server_restart(tmp_path):
    repo = tmp_path / "algo"
    repo.mkdir()
    (repo / "count.py").write_text(COUNTER)
    data_dir = tmp_path / "server"
    release = tmp_path / "release"
    server, url = start_server(data_dir)
    follower = None
    try:
        admin = admin_token(data_dir)
        init_sdk(url, token=admin)
        task = quick_train(
            algorithm_dir=repo, entrypoint=f"python count.py {release}", resource_polling=0.2
        )[0]
        env = {**os.environ, "ANYLEARN_HOST": url, "ANYLEARN_TOKEN": admin}
        follower = subprocess.Popen(
            [str(Path(sys.executable).parent / "anylearn"), "tasks", "logs", task.id, "-f"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_log(task, "line 9")
        time.sleep(0.5)  # the follower has read up to line 9 and is polling
        server.kill()
        server.wait()
        time.sleep(1.0)  # the follower's reads now fail
        server, _ = start_server(data_dir, port=int(url.rsplit(":", 1)[1]))
        release.touch()
        out, err = follower.communicate(timeout=120)
        assert follower.returncode == 0, err
        printed = [line for line in out.splitlines() if line.startswith("line ")]
        assert printed == [f"line {i}" for i in range(30)]  # every line, exactly once
        assert out.count("[anylearn] task SUCCEEDED") == 1
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        server.terminate()
        server.wait(timeout=30)
