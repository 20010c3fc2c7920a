"""``log_metrics``, ``log_params`` and ``set_tags``: what they write, what they refuse, and
that a task's lines land in the file its executor names."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from anylearn_sdk import TaskState, quick_train
from anylearn_sdk.errors import InvalidArgumentError

#: Runs in a fresh interpreter, as a training script does.
SCRIPT = textwrap.dedent("""
    from anylearn_sdk import log_metrics, log_params, set_tags
    log_params({"lr": 0.1, "optimizer": "sgd", "warm": True})
    for epoch in range(3):
        log_metrics({"loss": 1.0 / (epoch + 1), "acc": 0.5 + epoch / 10})
    log_metrics({"loss": 0.01}, step=100)
    set_tags({"stage": "baseline"})
    print("logged", flush=True)
""")


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outside_a_task_lines_go_to_a_local_run_folder(tmp_path):
    subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, check=True)
    (run,) = (tmp_path / "anylearn-runs").iterdir()
    rows = lines(run / "tracking.jsonl")
    metrics = [(r["key"], r["step"], r["value"]) for r in rows if r["kind"] == "metric"]
    assert metrics == [
        ("loss", 0, 1.0), ("acc", 0, 0.5),
        ("loss", 1, 0.5), ("acc", 1, 0.6),
        ("loss", 2, 1 / 3), ("acc", 2, 0.7),
        ("loss", 100, 0.01),
    ]  # fmt: skip
    params = {r["key"]: r["value"] for r in rows if r["kind"] == "param"}
    assert params == {"lr": "0.1", "optimizer": "sgd", "warm": "True"}
    assert [(r["key"], r["value"]) for r in rows if r["kind"] == "tag"] == [("stage", "baseline")]
    assert all(r["rank"] == 0 and r["time"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.log_metrics({"loss": math.nan}), "metric 'loss' = nan: use a finite number"),
        (lambda t: t.log_metrics({"loss": "0.3"}), "use a finite number"),
        (lambda t: t.log_metrics({"ok": True}), "use a finite number"),
        (lambda t: t.log_metrics({"loss": 1.0}, step=-1), "step -1: use a whole number"),
        (lambda t: t.log_metrics({"bad key!": 1.0}), "key 'bad key!': use 1 to 250"),
        (lambda t: t.log_metrics([("loss", 1.0)]), "give a mapping"),
        (lambda t: t.log_params({"lr": [0.1]}), "param 'lr' = [0.1]"),
        (lambda t: t.log_params({"p": "x" * 6001}), "6001 characters; at most 6000"),
        (lambda t: t.set_tags({"stage": 3}), "tag 'stage' = 3"),
    ],
)
def test_bad_keys_and_values_are_refused_and_nothing_is_written(
    tmp_path, monkeypatch, call, message
):
    from anylearn_sdk import tracking

    monkeypatch.setenv("ANYLEARN_TRACKING_FILE", str(tmp_path / "t.jsonl"))
    monkeypatch.setattr(tracking, "_path", None)
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace("[", r"\[")):
        call(tracking)
    tracking.log_metrics({"good": 1.0, "fine": 2.0})  # a good call after a refused one
    assert [r["key"] for r in lines(tmp_path / "t.jsonl")] == ["good", "fine"]


@pytest.mark.integration
def test_a_task_appends_to_the_file_its_executor_names(user, backend, tmp_path, quota_group):
    algo = tmp_path / "algo"
    algo.mkdir()
    (algo / "train.py").write_text(SCRIPT)
    task = quick_train(
        algorithm_dir=algo, entrypoint="python train.py", quota_group_name=quota_group
    )[0]
    assert task.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED, task.logs()[0]
    rows = lines(backend.data_dir / "tasks" / task.id / ".anylearn" / "tracking.jsonl")
    assert sum(r["kind"] == "metric" for r in rows) == 7
    assert not (algo / "anylearn-runs").exists()


def test_the_record_reads_whole_lines_the_lowest_rank_and_goes_on_from_its_offset(tmp_path):
    from anylearn_sdk.server.records import logged
    from anylearn_sdk.server.workspace import TaskPaths

    paths = TaskPaths(tmp_path, "task-1")
    paths.tracking.parent.mkdir(parents=True)

    def line(**item) -> str:
        return json.dumps({"time": 1.0, "rank": 0, **item}) + "\n"

    paths.tracking.write_text(
        line(kind="metric", key="loss", value=3.0, step=0, rank=1)
        + line(kind="metric", key="loss", value=2.0, step=0)
        + "not json\n"
        + line(kind="metric", key="loss", value=float("nan"))  # refused by the API; skipped
        + line(kind="param", key="lr", value="0.1")
        + '{"kind": "metric", "key": "loss", "val'  # being written
    )
    series, params, _ = logged(paths)
    assert series["loss"].values == [2.0] and params == {"lr": "0.1"}
    with open(paths.tracking, "a") as f:
        f.write('ue": 1.0, "step": 5, "time": 2.0, "rank": 0}\n')
    series, _, _ = logged(paths)
    assert (series["loss"].steps, series["loss"].values) == ([0, 5], [2.0, 1.0])
    assert (series["loss"].last, series["loss"].min, series["loss"].max) == (1.0, 1.0, 2.0)
    # A Ray node's copy adds its ranks; rank 0 still wins for "loss".
    paths.node_tracking(0).write_text(line(kind="metric", key="acc", value=0.5, rank=2))
    series, _, _ = logged(paths)
    assert series.keys() == {"loss", "acc"} and series["acc"].steps == [0]
    paths.tracking.unlink()  # replaced: read from the start
    paths.tracking.write_text(line(kind="metric", key="loss", value=9.0, step=1))
    assert logged(paths)[0]["loss"].values == [9.0]
