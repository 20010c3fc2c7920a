"""Protocol and input edges found by independent clients: never a 5xx, stock tus clients,
errors that are not mistaken for answers, and no call without an end."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from tusclient import client as tus_client

from anylearn_sdk import (
    TaskState,
    add_quota_group,
    gitsync,
    init_sdk,
    list_tokens,
    quick_train,
    revoke_token,
)
from anylearn_sdk.content.manifest import build_manifest
from anylearn_sdk.errors import AuthenticationError, GitSyncError
from anylearn_sdk.resources.algorithm import has_commit
from anylearn_sdk.server.context import hash_token
from anylearn_sdk.server.db import Token, make_engine, make_sessionmaker
from anylearn_sdk.server.db import TrainTask as DbTask
from anylearn_sdk.session import get_context
from anylearn_sdk.wire import TUS_VERSION
from tests.conftest import BadPeer, admin_token, database_args, git, start_server

pytestmark = pytest.mark.integration


def test_log_offsets_out_of_range_are_never_a_server_error(user, algorithm_repo):
    task = quick_train(algorithm_dir=algorithm_repo, entrypoint="python train.py")[0]
    headers = {"Authorization": f"Bearer {user.token}"}
    url = f"{user.backend.url}/api/v1/train-tasks/{task.id}/logs"
    far = requests.get(url, params={"offset": 2**62}, headers=headers, timeout=30)
    assert far.status_code == 200 and far.content == b""
    assert far.headers["X-Anylearn-Next-Offset"] == str(2**62)
    for bad in (2**63, 2**64, -1, "abc"):
        answer = requests.get(url, params={"offset": bad}, headers=headers, timeout=30)
        assert answer.status_code in (400, 422), (bad, answer.status_code)
        assert answer.json()["error"]["code"] == "bad_request"
    listing = f"{user.backend.url}/api/v1/train-tasks"
    for limit in (0, -5, 10_001, 2**70):
        answer = requests.get(listing, params={"limit": limit}, headers=headers, timeout=30)
        assert answer.status_code == 422, (limit, answer.status_code)


def test_tus_412_names_the_versions_the_server_speaks(user):
    answer = requests.post(
        f"{user.backend.url}/api/v1/uploads",
        headers={"Authorization": f"Bearer {user.token}", "Tus-Resumable": "0.2.2"},
        timeout=30,
    )
    assert answer.status_code == 412
    assert answer.headers["Tus-Version"] == TUS_VERSION  # tus 1.0 §Core, "Tus-Resumable"


def test_tuspy_uploads_with_its_default_sha1_checksums(user, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    blob = os.urandom(300_000)
    (folder / "blob.bin").write_bytes(blob)
    ctx = get_context()
    manifest = build_manifest(folder, ctx.store)
    version = ctx.api.post_json(
        "/datasets",
        {
            "name": "tuspy",
            "checksum": manifest.checksum,
            "manifest": [e.to_json() for e in manifest.entries],
        },
    )
    digest = hashlib.sha256(blob).hexdigest()
    assert version["missing"] == [digest]
    client = tus_client.TusClient(
        f"{user.backend.url}/api/v1/uploads", headers={"Authorization": f"Bearer {user.token}"}
    )
    uploader = client.uploader(
        file_stream=io.BytesIO(blob),  # tuspy leaves a file it opens itself unclosed
        chunk_size=64 * 1024,  # several PATCHes, each with its sha1 Upload-Checksum
        metadata={"kind": "object", "sha256": digest, "resource_id": version["id"]},
        upload_checksum=True,
    )
    assert uploader.checksum_algorithm_name == "sha1"
    uploader.upload()
    deadline = time.monotonic() + 30
    while user.get(f"/datasets/{version['id']}")["state"] != "READY":
        assert time.monotonic() < deadline, "the version never became READY"
        time.sleep(0.05)


def test_a_refused_token_is_not_a_missing_commit(user, algorithm_repo):
    task = quick_train(algorithm_dir=algorithm_repo, entrypoint="python train.py")[0]
    ctx = get_context()
    sha = git("rev-parse", "HEAD", cwd=algorithm_repo).strip()
    assert has_commit(ctx, task.algorithm_id, sha)
    assert not has_commit(ctx, task.algorithm_id, "0" * 40)  # a 404: missing
    login_token = next(t for t in list_tokens() if t.name == "login")
    revoke_token(login_token.id)
    with pytest.raises(AuthenticationError):
        has_commit(ctx, task.algorithm_id, sha)  # a 401 says nothing about the commit


def test_a_stuck_git_push_ends(algorithm_repo, tmp_path, monkeypatch):
    monkeypatch.setattr(gitsync, "PUSH_LOW_SPEED_SECONDS", 2)
    monkeypatch.setattr(gitsync, "PUSH_TIMEOUT_SECONDS", 20)
    snap = gitsync.snapshot(algorithm_repo, scratch_root=tmp_path / "snapshots")
    stuck = BadPeer(hang_up=False)
    try:
        started = time.monotonic()
        with pytest.raises(GitSyncError, match="git push"):
            gitsync.push(snap, f"{stuck.url}/repo.git", "al_secret")
        assert time.monotonic() - started < 20
    finally:
        stuck.close()


def test_a_stuck_environment_build_fails_its_task(tmp_path):
    index = BadPeer(hang_up=False)
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir, "--build-timeout", "2")
    try:
        init_sdk(url, token=admin_token(data_dir))
        algo = tmp_path / "algo"
        algo.mkdir()
        (algo / "requirements.txt").write_text(
            f"--index-url {index.url}/simple\nanylearn-never-answered\n"
        )
        (algo / "train.py").write_text("print('ran')\n")
        task = quick_train(algorithm_dir=algo, entrypoint="python train.py")[0]
        assert task.wait(timeout=60, poll_interval=0.2) == TaskState.FAILED
        assert "timed out after 2 s" in task.error
        assert task.command is None  # the entrypoint never ran
    finally:
        server.terminate()
        server.wait(timeout=30)
        index.close()


def test_schemathesis_finds_no_server_error(tmp_path):
    """A stock OpenAPI fuzzer (schemathesis) against a server of its own: every operation of
    the schema, with generated and mutated inputs, never gets a 5xx."""
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir)
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--header",
                f"Authorization: Bearer {admin_token(data_dir)}",
                "--max-examples",
                "20",
                "--seed",
                "1",
                "--exclude-path-regex",
                "/git/",  # git's own protocol, tested with git
                "--exclude-operation-id",
                "revoke_token_api_v1_tokens__token_id__delete",  # would end the run's own token
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # its example cache (.schemathesis/) stays out of the repository
        )
        failures = run.stdout.split("FAILURES", 1)[-1]
        assert run.returncode == 0, failures[:6000]
        assert " passed" in run.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_task_token_fetches_only_its_task_code_and_data(tmp_path):
    """The token a Ray node gets: its task's mounted versions, the owner's objects by sha256
    and git fetch of its algorithm, while the task is live; nothing else, and nothing after."""
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir)
    try:
        admin = admin_token(data_dir)
        init_sdk(url, token=admin)
        add_quota_group("one", capacity={"cpu": 1})
        release = tmp_path / "release"
        algo = tmp_path / "algo"
        algo.mkdir()
        (algo / "wait.py").write_text(
            f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists():\n"
            "    time.sleep(0.1)\n"
        )
        folders = []
        for name in ("mine", "other"):
            folder = tmp_path / name
            folder.mkdir()
            (folder / f"{name}.txt").write_text(f"{name} data\n")
            folders.append(folder)
        common = dict(algorithm_dir=algo, quota_group_name="one", entrypoint="python wait.py")
        running, _, (other,), _ = quick_train(dataset_dir=folders[1], **common)
        queued, algorithm, (dataset,), _ = quick_train(dataset_dir=folders[0], **common)
        secret = "al_task-token-of-the-test"
        engine = make_engine(
            (database_args(data_dir) or ["", f"sqlite:///{data_dir}/anylearn-server.db"])[1]
        )
        with make_sessionmaker(engine)() as session:
            owner = session.get(DbTask, queued.id).owner_id
            session.add(
                Token(user_id=owner, token_sha256=hash_token(secret), name="t", task_id=queued.id)
            )
            session.commit()
        engine.dispose()
        api = f"{url}/api/v1"
        as_task = {"Authorization": f"Bearer {secret}"}

        def get(path: str, **kwargs) -> requests.Response:
            return requests.get(f"{api}{path}", headers=as_task, timeout=30, **kwargs)

        mine = get(f"/datasets/{dataset.id}", params={"manifest": "true"})
        assert mine.status_code == 200
        (entry,) = mine.json()["manifest"]
        blob = get(f"/objects/{entry['sha256']}")
        assert blob.status_code == 200 and blob.content == b"mine data\n"
        assert hashlib.sha256(blob.content).hexdigest() == entry["sha256"]
        assert get(f"/objects/{'0' * 64}").status_code == 404
        refs = f"/algorithms/{algorithm.id}/git/info/refs"
        assert get(refs, params={"service": "git-upload-pack"}).status_code == 200
        refused = [
            get(f"/datasets/{other.id}"),  # not this task's mount
            get("/train-tasks"),
            get("/users/me"),
            get(refs, params={"service": "git-receive-pack"}),  # no push
            requests.post(f"{api}/datasets", headers=as_task, json={}, timeout=30),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        queued.cancel()
        assert get(f"/datasets/{dataset.id}").status_code == 401  # the task ended
        release.touch()
        assert running.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    finally:
        server.terminate()
        server.wait(timeout=30)
