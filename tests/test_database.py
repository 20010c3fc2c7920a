"""The metadata database: Alembic migrations on SQLite and PostgreSQL, and what a database
from before migrations keeps."""

from __future__ import annotations

import json
import shutil
import sqlite3

import psycopg
import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from anylearn_sdk import TaskState, add_quota_group, init_sdk, quick_train
from anylearn_sdk.protocol import ManifestEntry, manifest_checksum
from anylearn_sdk.server.db import MIGRATIONS, Base, make_engine
from tests.conftest import FIXTURES, start_server, wait_for_log
from tests.postgres import start_or_skip

pytestmark = pytest.mark.integration
V5 = FIXTURES / "schema-v5"


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def assert_schema_matches_models(url: str) -> None:
    """Migrate the database at ``url`` (as a starting server does); it then has exactly the
    models' tables, columns, types and indexes, at the newest revision."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() == head_revision()
    finally:
        engine.dispose()


@pytest.fixture
def postgres(database):
    """The session's PostgreSQL server (``--database postgresql``), else one of this test's
    own, stopped after it."""
    if database is not None:
        yield database
        return
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


def test_migrations_build_the_models_schema_on_sqlite(tmp_path):
    assert_schema_matches_models(f"sqlite:///{tmp_path / 'new.db'}")
    assert_schema_matches_models(f"sqlite:///{tmp_path / 'new.db'}")  # migrates nothing more


def test_migrations_build_the_models_schema_on_postgresql(postgres):
    url = postgres.new_database()
    assert_schema_matches_models(url)
    assert_schema_matches_models(url)


def test_a_database_from_before_migrations_keeps_its_rows(tmp_path):
    """A SQLite database of schema version 5 (the last before Alembic), with a user, a
    dataset and a finished task, upgraded by a new server: every row is still served."""
    data_dir = tmp_path / "server"
    data_dir.mkdir()
    db = sqlite3.connect(data_dir / "anylearn-server.db")
    db.executescript((V5 / "anylearn-server.sql").read_text())
    db.close()
    shutil.copy(V5 / "admin-credentials.json", data_dir)
    admin = json.loads((V5 / "admin-credentials.json").read_text())
    server, url = start_server(
        data_dir, "--database-url", f"sqlite:///{data_dir}/anylearn-server.db"
    )
    try:
        api = f"{url}/api/v1"
        headers = {"Authorization": f"Bearer {admin['token']}"}
        tasks = requests.get(f"{api}/train-tasks", headers=headers, timeout=30).json()
        assert [(t["id"], t["state"], t["hyperparams"]) for t in tasks] == [
            ("task-05da0a071d5154bd", "SUCCEEDED", {"lr": 0.1})
        ]
        assert tasks[0]["attempt"] == 1 and tasks[0]["mounts"]["dataset"]["ids"] == [
            "dset-3e917625b04bd8d7"
        ]
        datasets = requests.get(f"{api}/datasets", headers=headers, timeout=30).json()
        assert [(d["id"], d["state"], d["file_count"]) for d in datasets] == [
            ("dset-3e917625b04bd8d7", "READY", 3)
        ]
        # Its manifest, now kept as canonical bytes (migration 0005), still has its checksum.
        one = requests.get(
            f"{api}/datasets/{datasets[0]['id']}",
            params={"manifest": True},
            headers=headers,
            timeout=30,
        ).json()
        entries = [ManifestEntry.from_json(e) for e in one["manifest"]]
        assert len(entries) == 3 and manifest_checksum(entries) == one["checksum"]
        groups = requests.get(f"{api}/quota-groups", headers=headers, timeout=30).json()
        assert [g["name"] for g in groups] == ["default"]
        alice = requests.post(
            f"{api}/auth/login",
            json={"username": "alice", "password": "alice-password-1"},
            timeout=30,
        )
        assert alice.status_code == 200, alice.text
    finally:
        server.terminate()
        server.wait(timeout=30)
    revision = sqlite3.connect(data_dir / "anylearn-server.db").execute(
        "SELECT version_num FROM alembic_version"
    )
    assert revision.fetchall() == [(head_revision(),)]


def test_two_backends_on_one_database_share_the_queue(tmp_path, postgres):
    """Two backends on one PostgreSQL database and one shared file system (their data
    folders' contents are the same folders) both admit from the one queue: each follows only
    the tasks it admitted (none is taken for lost by the other, so every task runs once, as
    attempt 1), and a group of two CPUs never runs three one-CPU tasks at once."""
    url = postgres.new_database()
    first, second = tmp_path / "a", tmp_path / "b"
    backends = [start_server(first, "--database-url", url)]
    try:
        second.mkdir()
        for name in ("objects", "repos", "uploads", "tasks", "materialized", "environments"):
            (first / name).mkdir(exist_ok=True)
            (second / name).symlink_to(first / name)
        backends.append(start_server(second, "--database-url", url))
        token = json.loads((first / "admin-credentials.json").read_text())["token"]
        init_sdk(backends[0][1], token=token)
        add_quota_group("two-cpus", capacity={"cpu": 2})
        spans = tmp_path / "spans"
        algo = tmp_path / "algo"
        algo.mkdir()
        (algo / "span.py").write_text(
            "import time\n"
            "start = time.time(); time.sleep(1.0)\n"
            f"with open({str(spans)!r}, 'a') as f:\n"
            "    f.write(f'{start} {time.time()}\\n')\n"
        )

        def submit(backend: int):
            init_sdk(backends[backend][1], token=token)
            return quick_train(
                algorithm_dir=algo,
                entrypoint="python span.py",
                quota_group_name="two-cpus",
                quota_group_request={"cpu": 1},
            )[0]

        tasks = [submit(0)]
        wait_for_log(tasks[0], "running:")
        tasks += [submit(1), submit(0), submit(1), submit(0), submit(1)]
        for task in tasks:
            assert task.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED
            assert task.refresh().attempt == 1
        events = sorted(
            (float(t), step)
            for line in spans.read_text().splitlines()
            for t, step in zip(line.split(), (1, -1), strict=True)
        )
        assert len(events) == 12
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert peak <= 2
        with psycopg.connect(url) as conn:
            runners = {r for (r,) in conn.execute("SELECT runner FROM train_tasks")}
        assert len(runners) == 2, "the second backend admitted nothing"
    finally:
        for proc, _ in backends:
            proc.terminate()
            proc.wait(timeout=30)
