"""Admin and cleanup commands: users, tokens, quota groups, and removing datasets, models and
tasks, each refusing to remove what a live task uses."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
from click.testing import CliRunner

from anylearn_sdk import TaskState, quick_train, sync_model
from anylearn_sdk.cli.main import cli

pytestmark = pytest.mark.integration


def run(*args: str, env: dict | None = None, input: str | None = None):
    return CliRunner().invoke(cli, list(args), env=env, input=input)


def as_user(backend, token: str) -> dict:
    return {"ANYLEARN_HOST": backend.url, "ANYLEARN_TOKEN": token}


def status_with(backend, token: str) -> int:
    return requests.get(
        f"{backend.url}/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).status_code


def test_users_and_tokens(backend, algorithm_repo, monkeypatch):
    admin = as_user(backend, backend.admin_token)
    name = f"bob{uuid.uuid4().hex[:8]}"
    added = run("users", "add", name, "--password", "correct-horse", env=admin)
    assert added.exit_code == 0, added.output
    listed = json.loads(run("users", "ls", "--json", env=admin).output)
    assert name in {u["username"] for u in listed}
    assert run("users", "add", name, "--password", "correct-horse", env=admin).exit_code == 1
    short = run("users", "add", f"x{name}", "--password", "short", env=admin)
    assert short.exit_code == 1 and "password" in short.output

    # bob logs in, and makes a token of his own for CI, valid two seconds.
    login = run("login", "--host", backend.url, "--username", name, "--password", "correct-horse")
    assert login.exit_code == 0, login.output
    created = json.loads(
        run("tokens", "create", "--name", "ci", "--expires", "2s", "--json").output
    )
    assert created["name"] == "ci" and created["expires_at"] and created["token"].startswith("al_")
    assert status_with(backend, created["token"]) == 200
    mine = json.loads(run("tokens", "ls", "--json").output)
    assert {t["name"] for t in mine} == {"login", "ci"} and "token" not in mine[0]
    not_admin = run("users", "ls")
    assert not_admin.exit_code == 1 and "admin" in not_admin.output
    time.sleep(2.5)
    assert status_with(backend, created["token"]) == 401  # expired
    forever = json.loads(run("tokens", "create", "--json").output)
    assert run("tokens", "revoke", str(forever["id"])).exit_code == 0
    assert status_with(backend, forever["token"]) == 401  # revoked

    # A user with a live task is not removed; once it ended, the user and their data go.
    bob = as_user(backend, json.loads(run("tokens", "create", "--json").output)["token"])
    for key, value in bob.items():
        monkeypatch.setenv(key, value)
    task = quick_train(
        algorithm_dir=algorithm_repo, entrypoint="python train.py", hyperparams={"sleep": 30}
    )[0]
    refused = run("users", "rm", name, "--yes", env=admin)
    assert refused.exit_code == 1 and "queued or running" in refused.output
    task.cancel()
    removed = run("users", "rm", name, "--yes", env=admin)
    assert removed.exit_code == 0, removed.output
    assert status_with(backend, bob["ANYLEARN_TOKEN"]) == 401
    assert not (backend.data_dir / "tasks" / task.id).exists()
    assert name not in {
        u["username"] for u in json.loads(run("users", "ls", "--json", env=admin).output)
    }


def test_quota_groups(backend, user, algorithm_repo):
    admin = as_user(backend, backend.admin_token)
    name = f"q{uuid.uuid4().hex[:8]}"
    added = run("quota", "add", name, "--cpu", "1", "--memory-mb", "512", env=admin)
    assert added.exit_code == 0, added.output
    changed = run("quota", "set", name, "--cpu", "2", env=admin)
    assert changed.exit_code == 0, changed.output
    group = {g["name"]: g for g in json.loads(run("quota", "ls", "--json", env=admin).output)}[name]
    assert group["capacity"] == {"cpu": 2.0, "memory_mb": 512, "gpu": 0}  # memory stayed
    assert run("quota", "add", name, "--cpu", "1", env=admin).exit_code == 1  # exists
    assert run("quota", "set", name, "--cpu", "1", env=as_user(backend, user.token)).exit_code == 1

    task = quick_train(
        algorithm_dir=algorithm_repo,
        entrypoint="python train.py",
        quota_group_name=name,
        hyperparams={"sleep": 30},
    )[0]
    refused = run("quota", "rm", name, env=admin)
    assert refused.exit_code == 1 and "running" in refused.output
    task.cancel()
    assert run("quota", "rm", name, env=admin).exit_code == 0
    listed = run("quota", "ls", "--json", env=as_user(backend, user.token)).output
    assert name not in {g["name"] for g in json.loads(listed)}
    assert task.refresh().quota_group_id  # the finished task's record still names its group
    default = run("quota", "rm", "default", env=admin)
    assert default.exit_code == 1 and "cannot be removed" in default.output
    assert run("quota", "add", name, "--cpu", "1", env=admin).exit_code == 0  # back again


def test_removing_data_and_tasks(user, algorithm_repo, dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYLEARN_HOST", user.backend.url)
    monkeypatch.setenv("ANYLEARN_TOKEN", user.token)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "w.txt").write_text("1\n")
    model = sync_model(weights)
    task, _, datasets, _ = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        model_id=model.id,
        entrypoint="python train.py",
        hyperparams={"sleep": 30},
        resource_polling=0.2,
    )
    dataset = datasets[0]
    for args in (
        ["datasets", "rm", dataset.id],
        ["models", "rm", model.id[:10]],
        ["tasks", "rm", task.id],
    ):
        refused = run(*args)
        assert (
            refused.exit_code == 1 and "live task" in refused.output or "cancel" in refused.output
        )
    assert task.cancel() == TaskState.CANCELLED
    folder = user.backend.data_dir / "tasks" / task.id
    assert run("datasets", "rm", dataset.id).exit_code == 0
    assert run("models", "rm", model.id[:10]).exit_code == 0
    assert json.loads(run("datasets", "ls", "--json").output) == []
    assert json.loads(run("models", "ls", "--json").output) == []
    assert run("tasks", "rm", task.id).exit_code == 0
    assert not folder.exists()
    assert json.loads(run("tasks", "--json").output) == []
