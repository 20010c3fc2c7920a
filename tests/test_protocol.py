"""Pure wire formats: manifests, checksums, paths, hyperparameters, packs, error mapping."""

from __future__ import annotations

import hashlib
import io
import shlex
import tarfile

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

import anylearn_sdk
from anylearn_sdk.client.http import raise_for_status
from anylearn_sdk.content.pack import PackMember, PackReader
from anylearn_sdk.content.sources import FileSource
from anylearn_sdk.errors import AuthenticationError, NotFoundError, ServerError
from anylearn_sdk.protocol import (
    ManifestEntry,
    check_relative_path,
    format_hyperparams,
    manifest_checksum,
    validate_manifest,
)

names = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789_-", min_size=1, max_size=8)
entries = st.lists(
    st.builds(
        ManifestEntry,
        names,
        st.integers(0, 10**9),
        st.sampled_from([0o644, 0o755]),
        st.text("0123456789abcdef", min_size=64, max_size=64),
    ),
    unique_by=lambda e: e.path,
    max_size=20,
)


def test_public_api_is_what_we_mean():
    assert set(anylearn_sdk.__all__) == {
        "__version__",
        # inside a training script
        "log_metrics",
        "log_params",
        "set_tags",
        # the main job, and data on its own
        "quick_train",
        "resume_unfinished_local_train_tasks",
        "sync_dataset",
        "sync_model",
        "preview_dataset",
        "Preview",
        # connection
        "init_sdk",
        "login",
        "whoami",
        # typed results
        "Algorithm",
        "Dataset",
        "Mirror",
        "Model",
        "Project",
        "QuotaGroup",
        "TrainTask",
        "TaskRecord",
        "TaskSummary",
        "User",
        "Token",
        "NewTokenSecret",
        "ResourceState",
        "TaskState",
        # listings the CLI stands on
        "list_train_tasks",
        "follow_train_tasks",
        "newest_train_task",
        "resolve_task_id",
        "list_datasets",
        "list_models",
        "list_quota_groups",
        "list_mirrors",
        "delete_dataset",
        "delete_model",
        # tokens, and admin calls
        "create_token",
        "list_tokens",
        "revoke_token",
        "add_user",
        "list_users",
        "remove_user",
        "add_quota_group",
        "set_quota_group",
        "remove_quota_group",
        "add_mirror",
        "set_mirror",
        # experiment records
        "ExperimentRecord",
        "MetricSeries",
        # errors
        "AnylearnError",
        "RequiredLocalCommitError",
        "TaskFailedError",
    }
    for name in anylearn_sdk.__all__:
        assert getattr(anylearn_sdk, name) is not None, name


@given(entries, st.randoms())
def test_checksum_ignores_order(items, rnd):
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert manifest_checksum(items) == manifest_checksum(shuffled)


@given(entries)
def test_manifest_round_trips_through_json(items):
    assert validate_manifest([e.to_json() for e in items]) == sorted(items)


def test_manifest_rejects_unsafe_and_ambiguous_entries():
    good = {"path": "a", "size": 1, "mode": 0o644, "sha256": "0" * 64}
    for bad in (
        {**good, "path": "../a"},
        {**good, "path": "/a"},
        {**good, "mode": 0o777},
        {**good, "sha256": "xyz"},
        {**good, "size": -1},
    ):
        with pytest.raises(ValueError):
            validate_manifest([bad])
    with pytest.raises(ValueError, match="both a file and a folder"):
        validate_manifest([good, {**good, "path": "a/b"}])


@pytest.mark.parametrize("path", ["", "/abs", "../up", "a/../../b", "a\\b", "."])
def test_check_relative_path_refuses(path):
    with pytest.raises(ValueError):
        check_relative_path(path)


def test_check_relative_path_normalizes():
    assert check_relative_path("./out/models/") == "out/models"


@pytest.mark.parametrize(
    ("prefix", "delimiter", "expected"),
    [
        ("--", " ", "--lr 0.1 --name 'a b' --verbose"),
        ("--", "=", "--lr=0.1 '--name=a b' --verbose"),
        ("", "=", "lr=0.1 'name=a b' verbose"),
        ("+", "=", "+lr=0.1 '+name=a b' +verbose"),
        ("++", "=", "++lr=0.1 '++name=a b' ++verbose"),
    ],
)
def test_format_hyperparams(prefix, delimiter, expected):
    words = format_hyperparams({"lr": 0.1, "name": "a b", "verbose": ""}, prefix, delimiter)
    assert " ".join(words) == expected


@given(st.dictionaries(names, st.text(max_size=10)))
def test_hyperparams_survive_the_shell(params):
    words = format_hyperparams(params, "--", "=")
    expected = [f"--{k}={v}" if v != "" else f"--{k}" for k, v in params.items()]
    assert shlex.split(" ".join(words)) == expected


def test_pack_reads_the_same_at_any_offset(tmp_path):
    members = []
    for i, size in enumerate([0, 1, 511, 512, 513, 70_000]):
        data = bytes([i]) * size
        path = tmp_path / str(i)
        path.write_bytes(data)
        members.append(
            PackMember(hashlib.sha256(data).hexdigest(), size, FileSource(str(path), size))
        )
    reader = PackReader(members)
    whole = reader.read_at(0, reader.length)
    assert len(whole) == reader.length
    assert b"".join(reader.read_at(o, 1000) for o in range(0, reader.length, 1000)) == whole
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        for member in tar:
            assert hashlib.sha256(tar.extractfile(member).read()).hexdigest() == member.name


def _response(status, body=b""):
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.reason = "X"
    return response


def test_error_mapping():
    with pytest.raises(NotFoundError) as err:
        raise_for_status(
            _response(404, b'{"error": {"code": "not_found", "message": "task t not found"}}'),
            resource_id="t",
        )
    assert err.value.resource_id == "t" and err.value.code == "not_found"
    assert str(err.value) == "task t not found"
    with pytest.raises(AuthenticationError):
        raise_for_status(_response(401))
    with pytest.raises(ServerError):
        raise_for_status(_response(503, b"not json"))


def test_the_server_loads_no_client_code():
    import subprocess
    import sys

    probe = (
        "import sys; import anylearn_sdk.server.app, anylearn_sdk.server.runner; "
        "print(','.join(sorted(m for m in sys.modules if m.startswith('anylearn_sdk') "
        "or m == 'requests')))"
    )
    loaded = (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        .stdout.strip()
        .split(",")
    )
    client = [
        m
        for m in loaded
        if m == "requests"
        or m.startswith(("anylearn_sdk.client", "anylearn_sdk.resources", "anylearn_sdk.cli"))
        or m in ("anylearn_sdk.session", "anylearn_sdk.quickstart", "anylearn_sdk.local_backend")
    ]
    assert client == [], client
    assert "anylearn_sdk.wire" in loaded and "anylearn_sdk.datadir" in loaded


def test_one_rule_for_booleans_and_a_token_for_its_host(tmp_path):
    from anylearn_sdk.config import ConfigurationError, env_flag, env_positive_int, env_token

    for raw, expected in (("1", True), ("Yes", True), ("on", True), ("0", False), ("off", False)):
        assert env_flag("X", not expected, {"X": raw}) is expected
    assert env_flag("X", True, {}) is True and env_flag("X", False, {"X": ""}) is False
    with pytest.raises(ConfigurationError, match="X='maybe'"):
        env_flag("X", False, {"X": "maybe"})
    assert env_positive_int("N", {"N": "3"}) == 3 and env_positive_int("N", {}) is None
    with pytest.raises(ConfigurationError, match="N='0'"):
        env_positive_int("N", {"N": "0"})

    env = {"ANYLEARN_HOST": "http://a:1/", "ANYLEARN_TOKEN": "al_t"}
    assert env_token(tmp_path, "http://a:1", env) == "al_t"
    assert env_token(tmp_path, "http://b:1", env) is None  # never sent to another host
    (tmp_path / "config.json").write_text('{"host": "http://c:1"}')
    only_token = {"ANYLEARN_TOKEN": "al_t"}
    assert env_token(tmp_path, "http://c:1", only_token) == "al_t"  # the logged-in host's
    assert env_token(tmp_path, "http://d:1", only_token) is None


def test_the_token_never_follows_a_location_to_another_origin():
    from anylearn_sdk.client.http import ApiClient

    api = ApiClient("http://backend:8080", "al_secret")
    assert api.url("http://backend:8080/api/v1/uploads/1") == "http://backend:8080/api/v1/uploads/1"
    with pytest.raises(ServerError, match="elsewhere:9"):
        api.url("http://elsewhere:9/api/v1/uploads/1")
