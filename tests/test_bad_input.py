"""Bad input: one clear line, an AnylearnError, nothing created remotely or changed locally."""

from __future__ import annotations

import pytest

from anylearn_sdk import AnylearnError, init_sdk, quick_train
from anylearn_sdk.errors import AuthenticationError, InvalidArgumentError
from anylearn_sdk.session import get_context
from tests.conftest import repo_state

pytestmark = pytest.mark.integration
STORE_TABLES = ("hash_cache", "remote_resources", "train_tasks", "upload_units", "folder_manifests")


def server_state(user) -> dict:
    return {
        path: user.get(path)
        for path in ("/algorithms", "/datasets", "/models", "/train-tasks", "/projects")
    }


def local_state(repo) -> dict:
    store = get_context().store
    return {"repo": repo_state(repo), **{t: store.count(t) for t in STORE_TABLES}}


def _symlinked_output(repo, tmp_path) -> dict:
    (tmp_path / "elsewhere").mkdir()
    (repo / "out").symlink_to(tmp_path / "elsewhere")
    return {"output": "out"}


CASES = {
    "missing algorithm folder": (
        lambda repo, tmp: {"algorithm_dir": tmp / "nope"},
        "algorithm_dir",
    ),
    "missing dataset folder": (lambda repo, tmp: {"dataset_dir": tmp / "nope"}, "dataset_dir"),
    "output with ..": (lambda repo, tmp: {"output": "../x"}, "'..'"),
    "absolute output": (lambda repo, tmp: {"output": "/tmp/x"}, "absolute"),
    "symlinked output": (_symlinked_output, "symlink"),
    "unknown quota group": (lambda repo, tmp: {"quota_group_name": "nope"}, "available: default"),
    "unknown mirror": (lambda repo, tmp: {"mirror_name": "nope"}, "available: QUICKSTART"),
    "bad hyperparams": (lambda repo, tmp: {"hyperparams": {"lr": [1, 2]}}, "hyperparams['lr']"),
    "bad request": (lambda repo, tmp: {"quota_group_request": {"tpu": 1}}, "tpu"),
    "half a GPU": (lambda repo, tmp: {"quota_group_request": {"gpu": 0.5}}, "whole number"),
    "request over capacity": (
        lambda repo, tmp: {"quota_group_request": {"cpu": 4096}},
        "exceeds quota group 'default' capacity (cpu=4096 > ",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, user, algorithm_repo, dataset_dir, tmp_path):
    make_kwargs, expected = CASES[case]
    kwargs = {
        "algorithm_dir": algorithm_repo,
        "dataset_dir": dataset_dir,
        "entrypoint": "python train.py",
    }
    kwargs.update(make_kwargs(algorithm_repo, tmp_path))
    before_server, before_local = server_state(user), local_state(algorithm_repo)
    with pytest.raises(InvalidArgumentError) as err:
        quick_train(**kwargs)
    message = str(err.value)
    assert isinstance(err.value, AnylearnError)
    assert expected in message and "\n" not in message
    assert server_state(user) == before_server
    assert local_state(algorithm_repo) == before_local


def test_wrong_password(user):
    with pytest.raises(AuthenticationError) as err:
        init_sdk(user.backend.url, username=user.username, password="wrong-password")
    assert str(err.value) == "wrong username or password"
    assert user.get("/train-tasks") == []


def test_quick_train_does_not_mutate_arguments(user, algorithm_repo, dataset_dir):
    hyperparams = {"sleep": 0}
    request = {"cpu": 1}
    quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        hyperparams=hyperparams,
        quota_group_request=request,
        resource_polling=0.2,
    )
    assert hyperparams == {"sleep": 0} and request == {"cpu": 1}


def test_users_see_only_their_own_things(user, backend, algorithm_repo, dataset_dir):
    task, algorithm, datasets, _ = quick_train(
        algorithm_dir=algorithm_repo,
        dataset_dir=dataset_dir,
        entrypoint="python train.py",
        resource_polling=0.2,
    )
    import requests

    other = "other" + user.username
    backend.admin(
        "POST", "/users", json={"username": other, "password": "p" * 12}
    ).raise_for_status()
    token = requests.post(
        f"{backend.url}/api/v1/auth/login",
        json={"username": other, "password": "p" * 12},
        timeout=30,
    ).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    for path in (
        f"/train-tasks/{task.id}",
        f"/algorithms/{algorithm.id}",
        f"/datasets/{datasets[0].id}",
        f"/train-tasks/{task.id}/logs",
        f"/algorithms/{algorithm.id}/git/info/refs",
    ):
        response = requests.get(f"{backend.url}/api/v1{path}", headers=headers, timeout=30)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert (
        requests.get(f"{backend.url}/api/v1/train-tasks", headers=headers, timeout=30).json() == []
    )
