"""A failed task says why, in words a person can act on: in its record, in `anylearn tasks`,
in `tasks show`, in the SDK's error; and its results are not passed off as a success."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from anylearn_sdk import TaskFailedError, TaskState, quick_train
from anylearn_sdk.cli.main import cli
from anylearn_sdk.server.failures import failure_reason
from tests.conftest import git

BOOM = textwrap.dedent("""
    import os, sys
    print("loading", flush=True)
    if sys.argv[1] == "raise":
        def train(): return 1 / 0
        train()
    elif sys.argv[1] == "oom":
        os.kill(os.getpid(), 9)
""")


def log_file(tmp_path, text: str):
    path = tmp_path / "task.log"
    path.write_text(text)
    return path


def test_reasons_read_from_the_log(tmp_path):
    traceback = (
        "epoch 1\nTraceback (most recent call last):\n"
        '  File "train.py", line 3, in <module>\n    train()\n    ^^^^^^^\n'
        "KeyError: 'lr'\n[anylearn] task FAILED\n"
    )
    chained = traceback.replace("KeyError: 'lr'\n", "KeyError: 'lr'\n\nDuring handling...\n") + (
        'Traceback (most recent call last):\n  File "x", line 1\nValueError: bad lr\n'
    )
    cases = {
        traceback: (1, "exit code 1: KeyError: 'lr'"),
        chained: (1, "exit code 1: ValueError: bad lr"),
        "/bin/sh: 1: pythn: not found\n": (127, "exit code 127: command not found: pythn"),
        "sh: 1: ./run.sh: Permission denied\n": (126, "exit code 126: Permission denied: ./run.sh"),
        "step 3\n": (137, "exit code 137: killed by SIGKILL"),
        "python: can't open file '/x/trian.py': [Errno 2] No such file or directory\n": (
            2,
            "exit code 2; last output: python: can't open file '/x/trian.py'",
        ),
        "": (3, "exit code 3"),
        "[anylearn] running: x\n": (3, "exit code 3"),
    }
    for text, (code, expected) in cases.items():
        assert failure_reason(log_file(tmp_path, text), code).startswith(expected), text
    assert failure_reason(tmp_path / "missing.log", 4) == "exit code 4"


@pytest.mark.integration
def test_failed_tasks_say_why_everywhere(user, tmp_path, quota_group):
    algo = tmp_path / "algo"
    algo.mkdir()
    (algo / "boom.py").write_text(BOOM)
    git("init", "-q", "-b", "main", cwd=algo)
    git("add", ".", cwd=algo)
    git("commit", "-qm", "boom", cwd=algo)
    common = dict(algorithm_dir=algo, quota_group_name=quota_group, resource_polling=0.2)
    typo = quick_train(entrypoint="python trian.py", **common)[0]
    unknown = quick_train(entrypoint="pythn boom.py raise", **common)[0]
    raised = quick_train(entrypoint="python boom.py raise", **common)[0]
    killed = quick_train(entrypoint="python boom.py oom", **common)[0]

    with pytest.raises(TaskFailedError) as failure:
        raised.wait(timeout=60, poll_interval=0.2, raise_on_failure=True)
    assert str(failure.value) == (
        f"task {raised.id} FAILED: exit code 1: ZeroDivisionError: division by zero"
    )
    assert failure.value.state == TaskState.FAILED and failure.value.task_id == raised.id
    for task in (typo, unknown, killed):
        assert task.wait(timeout=60, poll_interval=0.2) == TaskState.FAILED
    assert typo.error.startswith("exit code 2; last output: ")
    assert "can't open file" in typo.error and "trian.py" in typo.error
    assert unknown.error == "exit code 127: command not found: pythn"
    assert killed.error.startswith("exit code 137: killed by SIGKILL")

    runner = CliRunner()
    listed = runner.invoke(cli, ["tasks"], env={"COLUMNS": "250"})
    for task in (typo, unknown, raised, killed):
        row = next(line for line in listed.output.splitlines() if task.id in line)
        assert task.error[:40] in row  # the reason, where the last log line would be
    shown = runner.invoke(cli, ["tasks", "show", raised.id], env={"COLUMNS": "250"})
    assert "ZeroDivisionError: division by zero" in shown.output
    assert "None" not in shown.output

    dest = tmp_path / "results"
    refused = runner.invoke(cli, ["tasks", "download", raised.id, str(dest)])
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1 and "ZeroDivisionError" in refused.output
    assert "--partial" in refused.output and not dest.exists()
    partial = runner.invoke(cli, ["tasks", "download", raised.id, str(dest), "--partial"])
    assert partial.exit_code == 0 and "FAILED" in partial.output and dest.is_dir()


@pytest.mark.integration
def test_an_unfinished_task_shows_no_exit_code(user, backend, algorithm_repo):
    backend.admin(
        "POST", "/quota-groups", json={"name": f"one{user.username}", "capacity": {"cpu": 1}}
    ).raise_for_status()
    common = dict(
        algorithm_dir=algorithm_repo,
        quota_group_name=f"one{user.username}",
        entrypoint="python train.py",
        resource_polling=0.2,
    )
    running = quick_train(hyperparams={"sleep": 30}, **common)[0]
    queued = quick_train(**common)[0]
    assert queued.refresh().state == TaskState.QUEUED
    shown = CliRunner().invoke(cli, ["tasks", "show", queued.id, "--json"])
    assert json.loads(shown.output)["exit_code"] is None
    table = CliRunner().invoke(cli, ["tasks", "show", queued.id], env={"COLUMNS": "200"})
    assert "None" not in table.output
    exit_row = next(line for line in table.output.splitlines() if "exit code" in line)
    assert exit_row.split()[-1] == "-"
    for task in (queued, running):
        task.cancel()
    assert running.refresh().error == "cancelled by the user"
