"""Experiment records: what a task's record holds, TensorBoard scalars, tracebacks, compare,
reuse of an identical run, and the export to MLflow (a real SQLite tracking store)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from anylearn_sdk import TaskState, quick_train
from anylearn_sdk.cli.main import cli
from anylearn_sdk.errors import InvalidArgumentError
from tests.conftest import age, git

pytestmark = pytest.mark.integration

#: Logs a curve that depends on --lr, a param, a tag; reads the dataset; writes outputs.
TRAIN = textwrap.dedent("""
    import argparse, os, pathlib
    from anylearn_sdk import log_metrics, log_params, set_tags
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dataset")
    p.add_argument("--raise", dest="boom", action="store_true")
    a, _ = p.parse_known_args()
    rows = sum(1 for f in pathlib.Path(a.dataset).rglob("*") if f.is_file()) if a.dataset else 0
    log_params({"optimizer": "sgd"})
    set_tags({"stage": "test"})
    for epoch in range(5):
        log_metrics({"loss": 1.0 / (1 + epoch * a.lr), "acc": 0.5 + epoch * a.lr / 10})
    out = pathlib.Path(os.environ["ANYLEARN_OUTPUT_DIR"])
    (out / "model.bin").write_bytes(b"weights" * 100)
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text(f"rows {rows}\\n")
    if a.boom:
        def inner():
            raise ValueError("the learning rate is not a number")
        inner()
""")


def _repo(tmp_path, script: str = TRAIN, name: str = "algo"):
    repo = tmp_path / name
    repo.mkdir()
    (repo / "train.py").write_text(script)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "first version", cwd=repo)
    return repo


def _data(tmp_path, name: str = "data"):
    data = tmp_path / name
    data.mkdir()
    for i in range(3):
        (data / f"{i}.csv").write_text(f"x,label\n{i},1\n")
    age(data)
    return data


def _run(**kwargs):
    kwargs.setdefault("entrypoint", "python train.py")
    kwargs.setdefault("resource_polling", 0.2)
    kwargs.setdefault("progress", False)
    task = quick_train(**kwargs)[0]
    task.wait(timeout=120, poll_interval=0.2)
    return task


def test_the_record_holds_code_data_parameters_environment_run_and_results(
    user, backend, tmp_path, quota_group
):
    repo, data = _repo(tmp_path), _data(tmp_path)
    base = git("rev-parse", "HEAD", cwd=repo).strip()
    (repo / "train.py").write_text(TRAIN + "\n# an uncommitted edit\n")
    (repo / "extra.py").write_text("X = 1\n")
    task = _run(
        algorithm_dir=repo,
        algorithm_force_update=True,
        dataset_dir=data,
        hyperparams={"lr": 0.5},
        quota_group_name=quota_group,
    )
    assert task.state == TaskState.SUCCEEDED, task.logs()[0]
    record = task.record()

    code = record.code
    assert code.commit == task.commit != base and code.snapshot and code.base_commit == base
    assert sorted(code.changed_files) == ["extra.py", "train.py"]
    assert code.message.startswith("anylearn snapshot of") and code.algorithm == "algo"
    (item,) = record.data.inputs
    assert (item.kind, item.name, item.file_count) == ("dataset", "data", 3)
    assert item.checksum == task.inputs[0].checksum
    params = record.parameters
    assert params.hyperparams == {"lr": 0.5} and params.entrypoint == "python train.py"
    assert params.command == task.command and "--lr 0.5" in params.command
    assert params.logged == {"optimizer": "sgd"} and params.tags == {"stage": "test"}
    env = record.environment
    assert env.python_version == ".".join(map(str, sys.version_info[:3]))
    assert any(p.lower().startswith("anylearn-sdk==") for p in env.packages), env.packages[:5]
    assert (env.num_nodes, env.nproc_per_node, env.mirror) == (1, 1, "QUICKSTART")
    run = record.run
    assert (run.state, run.exit_code, run.attempts, run.quota_group) == (
        TaskState.SUCCEEDED, 0, 1, quota_group,
    )  # fmt: skip
    assert run.created_at <= run.started_at <= run.finished_at and run.traceback is None

    loss = record.results.metrics["loss"]
    assert loss.steps == [0, 1, 2, 3, 4] and loss.source == "log_metrics"
    assert loss.values == pytest.approx([1 / (1 + e * 0.5) for e in range(5)])
    assert (loss.last, loss.min, loss.max) == (loss.values[-1], loss.values[-1], 1.0)
    assert all(t > 0 for t in loss.timestamps)
    output = backend.data_dir / "tasks" / task.id / "code" / "output"
    assert [(f.path, f.bytes, f.sha256) for f in record.results.outputs] == [
        (
            rel,
            (output / rel).stat().st_size,
            hashlib.sha256((output / rel).read_bytes()).hexdigest(),
        )
        for rel in ("model.bin", "sub/notes.txt")
    ]
    assert task.metrics(["acc"]).keys() == {"acc"}

    runner = CliRunner()
    shown = runner.invoke(cli, ["tasks", "show", task.id], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    for text in (f"over {base}", "extra.py", "metric loss", "model.bin", '"optimizer": "sgd"'):
        assert text in shown.output, text
    whole = json.loads(runner.invoke(cli, ["tasks", "show", task.id, "--json"]).output)
    assert whole["id"] == task.id and whole["record"]["code"]["base_commit"] == base
    drawn = runner.invoke(cli, ["tasks", "metrics", task.id[:12], "--key", "loss"])
    assert drawn.exit_code == 0 and "loss: last 0.333333" in drawn.output, drawn.output
    assert "acc" not in drawn.output
    as_json = json.loads(runner.invoke(cli, ["tasks", "metrics", task.id, "--json"]).output)
    assert as_json["acc"]["steps"] == [0, 1, 2, 3, 4]
    unknown = runner.invoke(cli, ["tasks", "metrics", task.id, "--key", "nope"])
    assert unknown.exit_code == 1 and "no metric 'nope'" in unknown.output


def test_tensorboard_scalars_are_metrics_too(user, tmp_path, quota_group):
    script = textwrap.dedent("""
        import os
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(os.environ["ANYLEARN_OUTPUT_DIR"], "tb"))
        for step in range(0, 50, 10):
            writer.add_scalar("train/loss", 2.0 / (step + 1), step)
            writer.add_scalar("lr", 0.1, step)
        writer.close()
    """)
    task = _run(algorithm_dir=_repo(tmp_path, script), quota_group_name=quota_group)
    assert task.state == TaskState.SUCCEEDED, task.logs()[0]
    metrics = task.record().results.metrics
    assert metrics.keys() == {"train/loss", "lr"}
    loss = metrics["train/loss"]
    assert loss.source == "tensorboard" and loss.steps == [0, 10, 20, 30, 40]
    assert loss.values == pytest.approx([2.0 / (s + 1) for s in range(0, 50, 10)])
    assert metrics["lr"].last == pytest.approx(0.1)


def test_the_record_of_a_task_that_raised_names_the_exception(user, tmp_path, quota_group):
    task = _run(
        algorithm_dir=_repo(tmp_path), hyperparams={"raise": ""}, quota_group_name=quota_group
    )
    assert task.state == TaskState.FAILED
    run = task.record().run
    assert run.exception == "ValueError: the learning rate is not a number"
    assert run.traceback.startswith("Traceback (most recent call last):")
    assert ", in inner\n    raise ValueError(" in run.traceback and run.exit_code == 1
    assert run.error == "exit code 1: ValueError: the learning rate is not a number"


def test_compare_marks_exactly_what_differs(user, tmp_path, quota_group):
    repo, data = _repo(tmp_path), _data(tmp_path)
    first = _run(
        algorithm_dir=repo, dataset_dir=data, hyperparams={"lr": 0.1}, quota_group_name=quota_group
    )
    (data / "1.csv").write_text("x,label\n1,0\n")  # one file of the dataset changed
    second = _run(
        algorithm_dir=repo, dataset_dir=data, hyperparams={"lr": 0.2}, quota_group_name=quota_group
    )
    assert first.state == second.state == TaskState.SUCCEEDED
    runner = CliRunner()
    result = runner.invoke(cli, ["tasks", "compare", first.id, second.id, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert [t["id"] for t in body["tasks"]] == [first.id, second.id]
    differing = {(r["section"], r["name"]) for r in body["rows"] if r["differs"]}
    # Both curves start equal (loss 1.0, acc 0.5 at epoch 0): loss's max, acc's min are equal.
    metric_rows = {("metrics", n) for n in ("loss (last)", "loss (min)", "acc (last)", "acc (max)")}
    assert differing == {
        ("data", "dataset data"), ("parameters", "hyperparameter lr"), *metric_rows
    }  # fmt: skip
    rows = {(r["section"], r["name"]): r for r in body["rows"]}
    assert rows[("parameters", "hyperparameter lr")]["values"] == ["0.1", "0.2"]
    assert rows[("code", "commit")]["values"] == [first.commit, second.commit]
    assert rows[("outcome", "elapsed")]["informational"]

    table = runner.invoke(cli, ["tasks", "compare", first.id, second.id], env={"COLUMNS": "250"})
    assert table.exit_code == 0, table.output
    marked = [line for line in table.output.splitlines() if line.lstrip().startswith("*")]
    assert len(marked) == len(differing) and any("hyperparameter lr" in m for m in marked)
    assert "rows differ" in table.output and "commit" not in table.output  # equal: not listed
    alone = runner.invoke(cli, ["tasks", "compare", first.id])
    assert alone.exit_code == 2 and "two or more" in alone.output


def test_reuse_returns_an_identical_succeeded_run_and_nothing_else(
    user, backend, tmp_path, quota_group, caplog
):
    mirror = f"m{uuid.uuid4().hex[:8]}"
    backend.admin(
        "POST", "/mirrors", json={"name": mirror, "python": sys.executable}
    ).raise_for_status()
    repo, data = _repo(tmp_path), _data(tmp_path)
    common = dict(
        algorithm_dir=repo,
        dataset_dir=data,
        hyperparams={"lr": 0.1},
        mirror_name=mirror,
        quota_group_name=quota_group,
    )
    first = _run(**common)
    assert first.state == TaskState.SUCCEEDED, first.logs()[0]
    with caplog.at_level("INFO", logger="anylearn_sdk"):
        again = quick_train(
            reuse="succeeded", entrypoint="python train.py", progress=False, **common
        )
    assert again[0].id == first.id and again[0].state == TaskState.SUCCEEDED
    assert f"reusing task {first.id} (SUCCEEDED): an identical run" in caplog.text

    def differs(**changes) -> None:
        task = quick_train(
            reuse="succeeded",
            progress=False,
            **{"entrypoint": "python train.py", **common, **changes},
        )[0]
        assert task.id != first.id, changes

    differs(entrypoint="python ./train.py")
    differs(hyperparams={"lr": 0.2})
    other_data = tmp_path / "data2"
    shutil.copytree(data, other_data)
    (other_data / "0.csv").write_text("x,label\n9,0\n")
    differs(dataset_dir=other_data)
    other_mirror = f"m{uuid.uuid4().hex[:8]}"
    backend.admin(
        "POST", "/mirrors", json={"name": other_mirror, "python": sys.executable}
    ).raise_for_status()
    differs(mirror_name=other_mirror)
    # The same mirror pointed at another interpreter: another environment.
    link = tmp_path / "python-link"
    os.symlink(sys.executable, link)
    runner = CliRunner()
    moved = runner.invoke(cli, ["mirrors", "set", mirror, "--python", str(link)])
    assert moved.exit_code == 1 and "admin" in moved.output.lower()  # a user may not
    backend.admin("PATCH", f"/mirrors/{mirror}", json={"python": str(link)}).raise_for_status()
    differs()
    backend.admin("PATCH", f"/mirrors/{mirror}", json={"python": sys.executable}).raise_for_status()
    assert quick_train(reuse="succeeded", entrypoint="python train.py", progress=False,
                       **common)[0].id == first.id  # fmt: skip
    # Without reuse (the default) an identical call runs again.
    assert quick_train(entrypoint="python train.py", progress=False, **common)[0].id != first.id
    (repo / "train.py").write_text(TRAIN + "\n# changed\n")
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qam", "second", cwd=repo)
    differs()
    with pytest.raises(InvalidArgumentError, match="reuse 'always': use one of run, succeeded"):
        quick_train(reuse="always", entrypoint="python train.py", **common)


def _run_id(output: str) -> str:
    return re.search(r"MLflow run (\w+)", output)[1]


# MLflow's own store code trips deprecations of its dependencies (SQLAlchemy's ``noload``).
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_export_to_mlflow_and_read_it_back(user, backend, tmp_path, quota_group, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts the default artifact root under the cwd
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    repo, data = _repo(tmp_path), _data(tmp_path)
    task = _run(
        algorithm_dir=repo, dataset_dir=data, hyperparams={"lr": 0.5}, quota_group_name=quota_group
    )
    assert task.state == TaskState.SUCCEEDED
    record = task.record()
    runner = CliRunner()
    args = ["tasks", "export", task.id, "--mlflow", "--tracking-uri", uri, "--experiment", "e1"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    run_id = _run_id(first.output)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.5", "optimizer": "sgd"}
    tags = run.data.tags
    assert tags["anylearn.task_id"] == task.id and tags["anylearn.commit"] == task.commit
    assert tags["mlflow.source.git.commit"] == task.commit and tags["anylearn.snapshot"] == "false"
    assert tags["anylearn.dataset.data"] == record.data.inputs[0].checksum
    assert tags["anylearn.backend"] == record.backend and tags["stage"] == "test"
    assert run.info.status == "FINISHED" and run.info.run_name == record.name
    for key, series in record.results.metrics.items():
        history = sorted(
            (m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)
        )
        expected = [
            (s, v, int(t * 1000))
            for s, v, t in zip(series.steps, series.values, series.timestamps, strict=True)
        ]
        assert history == expected, key
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "sub")
    }
    assert {"model.bin", "sub/notes.txt"} <= artifacts
    local = client.download_artifacts(run_id, "model.bin", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == b"weights" * 100

    again = runner.invoke(cli, args)  # updates the same run: no second run, no doubled points
    assert again.exit_code == 0 and _run_id(again.output) == run_id
    experiment = client.get_experiment_by_name("e1")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert len(client.get_metric_history(run_id, "loss")) == 5
    assert task.export_mlflow(tracking_uri=uri, experiment="e1") == run_id

    too_big = runner.invoke(cli, [*args, "--max-artifact-mb", "0.0001"])
    assert too_big.exit_code == 1, too_big.output
    assert "total 707 bytes (0.0 MiB) in 2 files, over --max-artifact-mb 0.0001" in too_big.output

    (repo / "train.py").write_text(TRAIN + "\n# dirty\n")
    dirty = _run(algorithm_dir=repo, algorithm_force_update=True, quota_group_name=quota_group)
    refused = runner.invoke(cli, ["tasks", "export", dirty.id, "--mlflow", "--tracking-uri", uri])
    assert refused.exit_code == 1 and "--allow-dirty" in refused.output
    assert "uncommitted changes over" in refused.output and "train.py" in refused.output
    assert len(client.search_runs(["0"])) == 0  # nothing was created
    allowed = runner.invoke(
        cli, ["tasks", "export", dirty.id, "--mlflow", "--tracking-uri", uri, "--allow-dirty"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert client.get_run(_run_id(allowed.output)).data.tags["anylearn.snapshot"] == "true"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_documented_example_runs(user, tmp_path):
    pytest.importorskip("mlflow")
    example = Path(__file__).resolve().parents[1] / "examples" / "experiments.py"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, str(example), "--mlflow-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "100 loss points" in out and "(the first run: True)" in out, out
    assert "differs: parameters hyperparameter lr" in out and "0.5 | 0.05" in out, out
    assert "differs: data" not in out and out.count("-> MLflow run") == 2, out
