"""The metadata database: Alembic migrations on SQLite and PostgreSQL, and what a database
from before migrations keeps."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from anylearn_sdk.server.db import MIGRATIONS, Base, make_engine
from tests.conftest import FIXTURES, start_server
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


def test_migrations_build_the_models_schema_on_sqlite(tmp_path):
    assert_schema_matches_models(f"sqlite:///{tmp_path / 'new.db'}")
    assert_schema_matches_models(f"sqlite:///{tmp_path / 'new.db'}")  # migrates nothing more


def test_migrations_build_the_models_schema_on_postgresql(database):
    server = database or start_or_skip()
    try:
        url = server.new_database()
        assert_schema_matches_models(url)
        assert_schema_matches_models(url)
    finally:
        if database is None:
            server.stop()


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
