"""The CLI through click's CliRunner, against the real backend."""

from __future__ import annotations

import json
import os
import re
import stat

import click
import pytest
from click.testing import CliRunner

from anylearn_sdk import TaskState, quick_train
from anylearn_sdk.cli.main import cli


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def test_every_command_is_in_the_cli_reference():
    from pathlib import Path

    reference = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for path, _ in all_commands(cli):
        assert " ".join(path) in reference, f"anylearn {' '.join(path)} is not in docs/cli.md"


def test_every_command_has_help():
    for path, command in all_commands(cli):
        assert command.help, f"anylearn {' '.join(path)} has no help text"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path


@pytest.mark.integration
def test_login_saves_a_private_token(backend, user, isolated_env, monkeypatch):
    result = CliRunner().invoke(
        cli,
        ["login", "--host", backend.url, "--username", user.username, "--password", user.password],
    )
    assert result.exit_code == 0, result.output
    credentials = isolated_env / ".anylearn" / "credentials.json"
    assert stat.S_IMODE(os.stat(credentials).st_mode) == 0o600
    assert json.loads(credentials.read_text())[backend.url]["username"] == user.username
    assert user.token not in (isolated_env / ".anylearn" / "config.json").read_text()


@pytest.mark.integration
def test_wrong_password_is_one_line(backend, user):
    result = CliRunner().invoke(
        cli,
        ["login", "--host", backend.url, "--username", user.username, "--password", "nope-nope"],
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: wrong username or password"


@pytest.mark.integration
def test_tasks_table_watch_and_logs(user, algorithm_repo, dataset_dir, monkeypatch):
    monkeypatch.setenv("ANYLEARN_HOST", user.backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", user.token)
    task, *_ = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        resource_polling=0.2,
    )
    runner = CliRunner()
    watched = runner.invoke(cli, ["tasks", "--watch", "--interval", "0.2"])
    assert watched.exit_code == 0, watched.output
    assert task.refresh().state == TaskState.SUCCEEDED
    listed = runner.invoke(cli, ["tasks"])
    assert task.id in listed.output and "SUCCEEDED" in listed.output
    logs = runner.invoke(cli, ["tasks", "logs", task.id])
    assert "done" in logs.output
    followed = runner.invoke(cli, ["tasks", "logs", task.id, "--follow"])
    assert followed.output == logs.output
    missing = runner.invoke(cli, ["tasks", "logs", "task-nope"])
    assert missing.exit_code == 1 and "not found" in missing.output


@pytest.mark.integration
def test_show_json_listings_and_a_failed_watch(user, algorithm_repo, dataset_dir, monkeypatch):
    monkeypatch.setenv("ANYLEARN_HOST", user.backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", user.token)
    task, algorithm, datasets, _ = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        hyperparams={"fail": "", "sleep": 0.5},
        resource_polling=0.2,
    )
    runner = CliRunner()
    watched = runner.invoke(cli, ["tasks", "--watch", "--interval", "0.2"])
    assert watched.exit_code == 3, watched.output  # the watched task FAILED
    assert task.refresh().state == TaskState.FAILED

    shown = runner.invoke(cli, ["tasks", "show", task.id], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    for text in (
        algorithm.commit,
        datasets[0].checksum,
        task.command,
        '{"fail": "", "sleep": 0.5}',
        f"ANYLEARN_TASK_ID={task.id}",
    ):
        assert text in shown.output, text
    assert re.search(r"exit code\s+3\s", shown.output) and re.search(r"attempt\s+1\s", shown.output)
    record = json.loads(runner.invoke(cli, ["tasks", "show", task.id, "--json"]).output)
    assert record["inputs"][0]["checksum"] == datasets[0].checksum
    assert record["exit_code"] == 3 and record["attempt"] == 1

    listed = json.loads(runner.invoke(cli, ["tasks", "--json"]).output)
    assert [(t["id"], t["state"], t["quota_group"]) for t in listed] == [
        (task.id, "FAILED", "default")
    ]
    assert listed[0]["last_line"] == "[anylearn] task FAILED: exit code 3; last output: started"
    assert listed[0]["error"] == "exit code 3; last output: started"
    assert user.get("/train-tasks", params={"state": "RUNNING,QUEUED"}) == []
    assert [t["id"] for t in user.get("/train-tasks", params={"state": "FAILED"})] == [task.id]
    dsets = json.loads(runner.invoke(cli, ["datasets", "ls", "--json"]).output)
    assert [d["id"] for d in dsets] == [datasets[0].id]
    assert json.loads(runner.invoke(cli, ["models", "ls", "--json"]).output) == []
    mirrors = json.loads(runner.invoke(cli, ["mirrors", "ls", "--json"]).output)
    assert "QUICKSTART" in {m["name"] for m in mirrors}
    groups = {
        g["name"]: g for g in json.loads(runner.invoke(cli, ["quota", "ls", "--json"]).output)
    }
    assert set(groups["default"]) >= {"capacity", "allocated", "running", "queued"}
    table = runner.invoke(cli, ["quota", "ls"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "default" in table.output


HTTP_MODULES = ("requests", "httpx", "urllib", "http", "aiohttp", "anylearn_sdk.client")


def test_the_cli_makes_no_http_call_of_its_own():
    """Every command calls the SDK: no HTTP client imported, no API client touched."""
    import ast
    from pathlib import Path

    import anylearn_sdk.cli

    for path in Path(anylearn_sdk.cli.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                if isinstance(node, ast.Attribute):
                    assert node.attr not in ("api", "get_json", "post_json"), path.name
                continue
            for name in names:
                assert not name.startswith(HTTP_MODULES), f"{path.name} imports {name}"


@pytest.mark.integration
def test_tables_fit_80_columns_and_never_cut_ids(user, algorithm_repo, dataset_dir, monkeypatch):
    monkeypatch.setenv("ANYLEARN_HOST", user.backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", user.token)
    tasks = [
        quick_train(
            algorithm_dir=algorithm_repo,
            dataset_dir=dataset_dir,
            entrypoint="python train.py",
            task_name="a-task-name-long-enough-to-be-cut-somewhere",
            resource_polling=0.2,
        )[0]
        for _ in range(2)
    ]
    for task in tasks:
        task.wait(timeout=60, poll_interval=0.2)
    runner = CliRunner()
    narrow = {"COLUMNS": "80"}
    listed = runner.invoke(cli, ["tasks"], env=narrow)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert all(len(line) <= 80 for line in lines), listed.output
    assert "last log line" in lines[0]
    for task in tasks:
        row = next(line for line in lines if task.id in line)  # whole, never "task-1e66…"
        assert "[anylearn] task" in row  # the log's last line is shown, as text not markup
    datasets = runner.invoke(cli, ["datasets", "ls"], env=narrow)
    dataset_ids = {d["id"] for d in user.get("/datasets")}
    assert all(len(line) <= 80 for line in datasets.output.splitlines())
    assert all(i in datasets.output for i in dataset_ids)
    groups = runner.invoke(cli, ["quota", "ls"], env=narrow)
    body = [line for line in groups.output.splitlines()[2:] if line.strip()]
    assert len(body) == len(user.get("/quota-groups"))  # one line per group, none wrapped
    assert all(len(line) <= 80 for line in groups.output.splitlines())


@pytest.mark.integration
def test_ids_by_prefix_and_the_newest_log(user, algorithm_repo, monkeypatch):
    monkeypatch.setenv("ANYLEARN_HOST", user.backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", user.token)
    first, second = (
        quick_train(
            algorithm_dir=algorithm_repo,
            entrypoint="python train.py",
            hyperparams={"note": note},
            resource_polling=0.2,
        )[0]
        for note in ("first", "second")
    )
    second.wait(timeout=60, poll_interval=0.2)
    runner = CliRunner()
    for ref in (second.id[:12], second.id.removeprefix("task-")[:6]):
        shown = runner.invoke(cli, ["tasks", "show", ref, "--json"])
        if shown.exit_code == 1 and "matches 2 tasks" in shown.output:
            continue  # both ids happen to share those characters
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["id"] == second.id
    ambiguous = runner.invoke(cli, ["tasks", "show", "task-"])
    assert ambiguous.exit_code == 1 and "matches 2 tasks" in ambiguous.output
    assert first.id in ambiguous.output and second.id in ambiguous.output
    newest = runner.invoke(cli, ["tasks", "logs"])
    assert newest.exit_code == 0 and "note second" in newest.output
    assert "note first" not in newest.output


@pytest.mark.integration
def test_cli_errors_are_one_line(user, algorithm_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYLEARN_HOST", user.backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", user.token)
    task = quick_train(algorithm_dir=algorithm_repo, entrypoint="python train.py")[0]
    task.wait(timeout=60, poll_interval=0.2)
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    runner = CliRunner()
    cases = [
        (["tasks", "download", task.id, str(existing)], 1, "is not a folder"),
        (["tasks", "show", "task-0000000000000000"], 1, "not found"),
        (["tasks", "--limit", "0"], 2, "--limit"),
        (["tasks", "nope"], 2, "No such command"),
        (["quota", "set", "default"], 2, "amount"),
        (["tokens", "create", "--expires", "soon"], 2, "duration"),
    ]
    for args, code, text in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, args
        assert text in result.output, (args, result.output)
    assert existing.read_text() == "mine"
