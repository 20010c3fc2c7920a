"""quick_train end to end against the real backend process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from anylearn_sdk import (
    RequiredLocalCommitError,
    TaskState,
    TrainTask,
    delete_dataset,
    quick_train,
    resume_unfinished_local_train_tasks,
)
from anylearn_sdk.content.manifest import build_manifest
from anylearn_sdk.session import get_context
from tests.conftest import git, repo_state

pytestmark = pytest.mark.integration


def test_full_quick_train(user, algorithm_repo, dataset_dir, tmp_path):
    task, algorithm, datasets, project = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        hyperparams={"note": "${ANYLEARN_DATASET_DIR}/a.txt", "flag": ""},
        resource_polling=0.2,
    )
    assert task.state == TaskState.QUEUED
    assert algorithm.commit == git("rev-parse", "HEAD", cwd=algorithm_repo).strip()
    assert algorithm.pushed
    assert project.is_default
    assert datasets[0].uploaded_bytes > 70_000
    assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    log = "".join(task.stream_logs(poll_interval=0.2))
    mount = task.refresh().command.split("--dataset ")[1].split()[0]
    assert f"note {mount}/a.txt" in log  # ${VAR} placeholder expanded in a hyperparameter value
    assert f"env dataset {mount}" in log
    assert "'--flag'" in log  # a "" value is a bare flag
    results = task.download_results(tmp_path / "results")
    assert (results / "a.txt").read_text() == "alpha\n"
    row = get_context().store.db["train_tasks"].get((get_context().server_id, task.id))
    assert row["state"] == "SUCCEEDED" and row["username"] == ""
    assert TrainTask(task.id, load_detail=True).commit == algorithm.commit


def test_resubmit_uploads_nothing_and_pushes_nothing(user, algorithm_repo, dataset_dir):
    kwargs = dict(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        resource_polling=0.2,
    )
    first = quick_train(**kwargs)
    second = quick_train(**kwargs)
    assert second[2][0].id == first[2][0].id
    assert second[2][0].uploaded_bytes == 0
    assert second[1].commit == first[1].commit and not second[1].pushed
    refs = subprocess.run(
        [
            "git",
            "--git-dir",
            str(user.backend.data_dir / "repos" / f"{first[1].id}.git"),
            "for-each-ref",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(refs) == 1
    # An unchanged folder is not read again: every hash comes from the cache.
    assert build_manifest(dataset_dir, get_context().store).hashed_bytes == 0
    assert first[0].wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    assert second[0].wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED


def test_dataset_deleted_on_server_is_registered_again(user, algorithm_repo, dataset_dir):
    kwargs = dict(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        resource_polling=0.2,
    )
    task, _, datasets, _ = quick_train(**kwargs)
    first = datasets[0]
    task.wait(timeout=60, poll_interval=0.2)  # a live task's dataset cannot be deleted
    delete_dataset(first.id)
    again = quick_train(**kwargs)[2][0]
    assert again.id != first.id and again.state == "READY"


def test_changed_file_is_hashed_again(user, dataset_dir):
    store = get_context().store
    first = build_manifest(dataset_dir, store)
    (dataset_dir / "a.txt").write_text("changed\n")
    second = build_manifest(dataset_dir, store)
    assert second.checksum != first.checksum
    assert second.hashed_bytes == len("changed\n")


def test_dirty_repository_refused_without_force(user, algorithm_repo, dataset_dir):
    (algorithm_repo / "train.py").write_text(
        "# dirty\n" + (algorithm_repo / "train.py").read_text()
    )
    (algorithm_repo / "new.py").write_text("x = 1\n")
    before = repo_state(algorithm_repo)
    with pytest.raises(RequiredLocalCommitError) as err:
        quick_train(
            algorithm_dir=algorithm_repo, dataset_dir=dataset_dir, entrypoint="python train.py"
        )
    assert "train.py" in str(err.value) and "new.py" in str(err.value)
    assert "\n" not in str(err.value)
    assert repo_state(algorithm_repo) == before
    assert user.get("/algorithms") == [] and user.get("/datasets") == []
    assert user.get("/train-tasks") == []


def test_dirty_repository_snapshotted_with_force(user, algorithm_repo, dataset_dir, tmp_path):
    (algorithm_repo / "train.py").write_text(
        "# dirty v2\n" + (algorithm_repo / "train.py").read_text()
    )
    (algorithm_repo / "helper.py").write_text("x = 1\n")
    (algorithm_repo / "ignored").mkdir()
    (algorithm_repo / "ignored" / "big.bin").write_bytes(b"0" * 10)
    git("add", "helper.py", cwd=algorithm_repo)  # a staged change must survive as staged
    before = repo_state(algorithm_repo)
    task, algorithm, _, _ = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        algorithm_force_update=True,
        resource_polling=0.2,
    )
    assert repo_state(algorithm_repo) == before
    assert algorithm.commit != before["head"].strip()
    assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    results = task.download_results(tmp_path / "r")
    assert (results / "version.txt").read_text() == "# dirty v2"
    files = git("ls-tree", "-r", "--name-only", algorithm.commit, cwd=algorithm_repo).split()
    assert "helper.py" in files and "ignored/big.bin" not in files
    # The same tree snapshotted again is the same commit: nothing new to push.
    again = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        algorithm_force_update=True,
        resource_polling=0.2,
    )[1]
    assert again.commit == algorithm.commit and not again.pushed


def test_plain_folder_gets_no_git_dir(user, tmp_path, dataset_dir):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "train.py").write_text("print('hi')\n")
    task, algorithm, _, _ = quick_train(
        algorithm_dir=folder,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        resource_polling=0.2,
    )
    assert not (folder / ".git").exists()
    assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED


def test_resume_after_submitting_process_exits(user, algorithm_repo, dataset_dir, quota_group):
    script = textwrap.dedent(f"""
        from anylearn_sdk import init_sdk, quick_train
        init_sdk({user.backend.url!r}, token={user.token!r})
        task, *_ = quick_train(algorithm_dir={str(algorithm_repo)!r},
                               dataset_dir={str(dataset_dir)!r},
                               entrypoint="python train.py", hyperparams={{"sleep": 1}},
                               quota_group_name={quota_group!r}, resource_polling=0.2)
        print(task.id)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    task_id = out.stdout.strip().splitlines()[-1]
    tasks = resume_unfinished_local_train_tasks()
    assert [t.id for t in tasks] == [task_id]
    assert tasks[0].wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    assert resume_unfinished_local_train_tasks() == []


def processes_of(task_id: str) -> list[int]:
    """Live pids whose environment carries the task's ANYLEARN_TASK_ID."""
    marker = f"ANYLEARN_TASK_ID={task_id}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def test_cancel_ends_every_rank(user, algorithm_repo, dataset_dir, quota_group):
    task, *_ = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        hyperparams={"sleep": 120},
        quota_group_name=quota_group,
        num_nodes=2,
        nproc_per_node=2,
        resource_polling=0.2,
    )
    deadline = time.monotonic() + 30
    while task.logs()[0].count("started") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert task.refresh().state == TaskState.RUNNING
    assert len(processes_of(task.id)) >= 4  # four ranks (and their supervisors)
    assert task.cancel() == TaskState.CANCELLED
    deadline = time.monotonic() + 15
    while processes_of(task.id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(task.id) == []
    assert task.refresh().state == TaskState.CANCELLED


def test_queued_while_quota_group_full(user, backend, algorithm_repo, dataset_dir):
    name = f"tiny{time.monotonic_ns()}"
    backend.admin(
        "POST", "/quota-groups", json={"name": name, "capacity": {"cpu": 1}}
    ).raise_for_status()
    kwargs = dict(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        quota_group_name=name,
        resource_polling=0.2,
    )
    first = quick_train(hyperparams={"sleep": 30}, **kwargs)[0]
    second = quick_train(**kwargs)[0]
    deadline = time.monotonic() + 30
    while first.refresh().state != TaskState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # several scheduler ticks
    assert second.refresh().state == TaskState.QUEUED
    first.cancel()
    assert second.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
