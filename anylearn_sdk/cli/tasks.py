"""``anylearn tasks``: list and watch, show, compare, metrics, logs, cancel, download,
register-model, export, rm.

Every TASK argument takes an id or a unique prefix of one (``task-e98c``, or ``e98c``).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from anylearn_sdk.cli.charts import charts
from anylearn_sdk.cli.output import Col, json_option, size, state_text, table, to_json, when
from anylearn_sdk.compare import compare as compare_records
from anylearn_sdk.errors import ServerError
from anylearn_sdk.resources.train_task import (
    DEFAULT_MAX_ARTIFACT_MB,
    TrainTask,
    follow_train_tasks,
    list_train_tasks,
    newest_train_task,
    resolve_task_id,
)
from anylearn_sdk.states import TaskState
from anylearn_sdk.wire import TaskSummary

#: Exit status of ``anylearn tasks --watch`` when a watched task ended FAILED or CANCELLED.
EXIT_TASK_FAILED = 3
#: Lines a live table leaves for its header and caption.
TABLE_CHROME_LINES = 6
_FAILED = (TaskState.FAILED, TaskState.CANCELLED)


def _elapsed(started: datetime | None, finished: datetime | None, now: datetime) -> str:
    """Run time (start to end, or to now while running); ``-`` before the start."""
    if started is None:
        return "-"
    seconds = max(0, int(((finished or now) - started).total_seconds()))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _last(task: TaskSummary) -> str:
    """The last log line; for a failed task its reason, which says more."""
    if task.state in _FAILED and task.error:
        return task.error
    return task.last_line


def _columns(now: datetime) -> list[Col]:
    return [
        Col("id", lambda t: t.id, key=True),
        Col("name", lambda t: t.name, min_width=6),
        Col("state", lambda t: state_text(t.state), key=True),
        Col("quota group", lambda t: t.quota_group, min_width=5),
        Col("elapsed", lambda t: _elapsed(t.started_at, t.finished_at, now), key=True),
        Col("last log line", _last, flex=True, min_width=16),
    ]


def render(rows: list[TaskSummary], width: int, max_rows: int | None = None) -> Table:
    """The task table: id, name, state, quota group, elapsed, last log line (or, for a
    failed task, its reason), fitted to ``width``.

    With ``max_rows``, only the newest that many are shown; the caption counts every task by
    state either way.
    """
    shown = rows if max_rows is None else rows[-max_rows:] if max_rows > 0 else []
    counts: dict[str, int] = {}
    for t in rows:
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
    caption = f"{len(rows)} tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if len(shown) < len(rows):
        caption += f" ({len(rows) - len(shown)} older not shown)"
    return table(_columns(datetime.now(UTC)), shown, width, caption)


@click.group(invoke_without_command=True)
@click.option("--watch", is_flag=True, help="Refresh in place until every shown task has ended.")
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between refreshes.",
)
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="How many of the newest tasks.",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in TaskState], case_sensitive=False),
    help="Only tasks in this state (repeat for several).",
)
@json_option
@click.pass_context
def tasks(
    ctx: click.Context,
    watch: bool,
    interval: float,
    limit: int,
    states: tuple[str, ...],
    as_json: bool,
) -> None:
    """List your newest train tasks: id, name, state, quota group, elapsed, last log line.

    With --watch the table refreshes in place, one request per refresh, until every task that
    was queued or running has ended; it waits through backend restarts. The exit status is 3
    if one of them FAILED or was CANCELLED.
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = list_train_tasks(state=[s.upper() for s in states] or None, limit=limit)
    if as_json:
        click.echo(to_json(rows))
        return
    console = Console()
    if not watch:
        console.print(render(rows, console.width))
        return
    sys.exit(watch_tasks(rows, interval, console))


def watch_tasks(rows: list[TaskSummary], interval: float, console: Console) -> int:
    """Refresh ``rows`` in place until the unfinished ones end; returns the exit status."""
    watched = {t.id for t in rows if not t.state.is_terminal}

    def height() -> int:
        return max(1, console.size.height - TABLE_CHROME_LINES)

    def disconnected(err: ServerError) -> None:
        click.echo(f"anylearn: {err}; retrying", err=True)

    with Live(render(rows, console.width, height()), console=console, auto_refresh=False) as live:
        for fresh in follow_train_tasks(rows, interval=interval, on_disconnect=disconnected):
            rows = fresh
            live.update(render(rows, console.width, height()), refresh=True)
    failed = [t for t in rows if t.id in watched and t.state in _FAILED]
    return EXIT_TASK_FAILED if failed else 0


def _task(ref: str) -> TrainTask:
    return TrainTask(resolve_task_id(ref))


@tasks.command()
@click.argument("task_ref", metavar="TASK")
@json_option
def show(task_ref: str, as_json: bool) -> None:
    """Show a task's experiment record: code (commit, message, uncommitted changes), inputs
    and their checksums, hyperparameters and the exact command line, environment (Python,
    packages), quota group and request, timings, exit code, why it failed (with the last
    traceback), attempts, metric summaries and output files. ``--json``: the task's fields
    with the whole record under ``"record"``."""
    task = _task(task_ref).refresh()
    info = task.info
    record = task.record()
    if as_json:
        whole = info.model_dump(mode="json") | {"record": record.model_dump(mode="json")}
        click.echo(json.dumps(whole, indent=2))
        return
    code, env, run, params = record.code, record.environment, record.run, record.parameters
    commit = code.commit + (f"  {code.message.splitlines()[0]}" if code.message else "")
    if code.snapshot and code.base_commit:
        commit += f"\nsnapshot of uncommitted changes over {code.base_commit}"
        commit += f": {', '.join(code.changed_files)}" if code.changed_files else ""
    elif code.snapshot:
        commit += "\nsnapshot of a folder without git"
    fields: list[tuple[str, str | Text]] = [
        ("id", info.id),
        ("name", info.name),
        ("state", state_text(info.state)),
        ("error", info.error or "-"),
        ("exit code", "-" if info.exit_code is None else str(info.exit_code)),
        ("attempt", str(info.attempt)),
        ("algorithm", f"{code.algorithm} ({info.algorithm_id})"),
        ("commit", commit),
        ("entrypoint", info.entrypoint),
        ("hyperparameters", json.dumps(info.hyperparams)),
        ("command", info.command or "-"),
        ("output", info.output),
        ("quota group", f"{run.quota_group}, request {json.dumps(run.request.model_dump())}"),
        ("processes", f"{info.num_nodes} node(s) x {info.nproc_per_node}"),
        ("mirror", env.mirror or env.mirror_id),
        ("python", " ".join(filter(None, [env.python, env.python_version])) or "-"),
        ("environment", env.environment or "none (no requirements.txt)"),
        ("packages", f"{len(env.packages)} (--json lists them)" if env.packages else "-"),
        ("gpus", ",".join(map(str, env.gpus)) or "-"),
        ("created", when(info.created_at)),
        ("started", when(info.started_at)),
        ("finished", when(info.finished_at)),
        ("elapsed", _elapsed(info.started_at, info.finished_at, datetime.now(UTC))),
    ]
    for item in info.inputs:
        detail = item.id
        if item.checksum is not None:
            detail += (
                f" ({item.name}, {item.file_count} files, {size(item.total_bytes)}, "
                f"checksum {item.checksum})"
            )
        fields.append((f"{item.kind} input", detail))
    for name, value in (("logged params", params.logged), ("tags", params.tags)):
        if value:
            fields.append((name, json.dumps(value)))
    if run.traceback:
        fields.append(("traceback", run.traceback))
    for key, series in record.results.metrics.items():
        summary = "no points yet"
        if series.values:
            summary = (
                f"last {series.last:.6g}, min {series.min:.6g}, max {series.max:.6g} "
                f"({len(series.values)} points to step {series.steps[-1]})"
            )
        fields.append((f"metric {key}", summary))
    outputs = record.results.outputs
    if outputs:
        listed = "\n".join(f"{f.path}  {size(f.bytes)}  {f.sha256[:16]}" for f in outputs[:20])
        more = len(outputs) - 20
        listed += f"\n... {more} more (--json lists them)" if more > 0 else ""
        fields.append(("output files", listed))
    env_vars = "\n".join(f"{k}={v}" for k, v in sorted(info.runtime.env.items()))
    fields.append(("env", env_vars or "-"))
    out = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    out.add_column(style="bold", no_wrap=True)
    out.add_column(overflow="fold")
    for name, value in fields:
        out.add_row(name, value if isinstance(value, Text) else Text(value))
    Console().print(out)


@tasks.command()
@click.argument("task_refs", metavar="TASK TASK [TASK...]", nargs=-1, required=True)
@json_option
@click.option("--all", "show_all", is_flag=True, help="Also list the rows that are equal.")
def compare(task_refs: tuple[str, ...], as_json: bool, show_all: bool) -> None:
    """Compare tasks side by side: code, data, parameters, environment, outcome and metric
    summaries, one column per task; rows that differ are marked with ``*``. Without
    ``--all`` only the rows that differ, and the outcome, are listed."""
    if len(task_refs) < 2:
        raise click.UsageError("give two or more tasks")
    records = [_task(ref).record() for ref in task_refs]
    rows = compare_records(records)
    if as_json:
        tasks_json = [{"id": r.task_id, "name": r.name} for r in records]
        body = {"tasks": tasks_json, "rows": [row.as_json() for row in rows]}
        click.echo(json.dumps(body, indent=2))
        return
    shown = [r for r in rows if show_all or r.differs or r.section == "outcome"]
    out = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    out.add_column("", no_wrap=True)
    out.add_column("section", no_wrap=True)
    out.add_column("row", overflow="fold")
    for record in records:
        out.add_column(Text(f"{record.task_id}\n{record.name}"), overflow="fold")
    for row in shown:
        style = "bold yellow" if row.differs else ""
        cells = [Text(v, style=style) for v in row.values]
        out.add_row(Text("*" if row.differs else ""), row.section, Text(row.name), *cells)
    differing = sum(r.differs for r in rows)
    out.caption = f"{differing} of {len(rows)} rows differ" + (
        "" if show_all else "; --all lists every row"
    )
    out.caption_justify = "left"
    Console().print(out)


@tasks.command()
@click.argument("task_ref", metavar="TASK")
@click.option("--key", "keys", multiple=True, help="Only this metric (repeatable).")
@json_option
def metrics(task_ref: str, keys: tuple[str, ...], as_json: bool) -> None:
    """Draw a task's metric series in the terminal, one chart per key (``--json``: the
    series, each with its steps, values, timestamps and last/min/max). Works while the task
    runs: the series so far."""
    task = _task(task_ref)
    series = task.metrics(keys or None)
    missing = [k for k in keys if k not in series]
    if as_json:
        click.echo(json.dumps({k: v.model_dump(mode="json") for k, v in series.items()}, indent=2))
    elif series:
        console = Console()
        click.echo(charts(series.values(), console.width - 2, color=console.is_terminal))
    else:
        click.echo(f"{task.id}: no metrics logged yet")
    if missing:
        raise click.ClickException(f"no metric {', '.join(map(repr, missing))} in {task.id}")


@tasks.command()
@click.argument("task_ref", metavar="TASK")
@click.option("--mlflow", "to_mlflow", is_flag=True, required=True, help="Export to MLflow.")
@click.option(
    "--tracking-uri", help="MLflow tracking URI (default: MLflow's, MLFLOW_TRACKING_URI)."
)
@click.option("--experiment", help="MLflow experiment name (made if missing; default: MLflow's).")
@click.option(
    "--max-artifact-mb",
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_ARTIFACT_MB,
    show_default=True,
    help="Refuse if the output files total more MiB than this.",
)
@click.option(
    "--allow-dirty", is_flag=True, help="Export a task whose code had uncommitted changes."
)
def export(
    task_ref: str,
    to_mlflow: bool,
    tracking_uri: str | None,
    experiment: str | None,
    max_artifact_mb: float,
    allow_dirty: bool,
) -> None:
    """Export a finished task to MLflow as one run: parameters, every metric point with its
    step and time, tags (commit, input checksums, task id) and output files as artifacts.
    Exporting it again updates the same run. Needs ``pip install 'anylearn-sdk[mlflow]'``."""
    task = _task(task_ref)
    run_id = task.export_mlflow(
        tracking_uri=tracking_uri,
        experiment=experiment,
        max_artifact_mb=max_artifact_mb,
        allow_dirty=allow_dirty,
    )
    click.echo(f"{task.id}: MLflow run {run_id}")


@tasks.command()
@click.argument("task_ref", metavar="[TASK]", required=False)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing until the task ends; waits through server restarts and network drops.",
)
def logs(task_ref: str | None, follow: bool) -> None:
    """Print a task's log. Without TASK, follow the log of your newest task."""
    if task_ref is None:
        task, follow = newest_train_task(), True
        click.echo(f"anylearn: following {task.id}", err=True)
    else:
        task = _task(task_ref)
    if follow:

        def disconnected(err: ServerError, offset: int) -> None:
            click.echo(f"anylearn: {err}; reconnecting from byte {offset}", err=True)

        for text in task.stream_logs(on_disconnect=disconnected):
            click.echo(text, nl=False)
        return
    offset = 0
    while True:
        text, next_offset = task.logs(offset)
        if next_offset == offset:
            return
        click.echo(text, nl=False)
        offset = next_offset


@tasks.command()
@click.argument("task_ref", metavar="TASK")
def cancel(task_ref: str) -> None:
    """Cancel a queued or running task (every process gets SIGTERM, then SIGKILL)."""
    task = _task(task_ref)
    click.echo(f"{task.id}: {task.cancel().value}")


@tasks.command()
@click.argument("task_ref", metavar="TASK")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--partial",
    is_flag=True,
    help="Also download what a failed, cancelled or running task has written so far.",
)
def download(task_ref: str, dest: Path, partial: bool) -> None:
    """Download a SUCCEEDED task's results into the folder DEST (made if missing)."""
    task = _task(task_ref)
    path = task.download_results(dest, allow_partial=partial)
    files = sum(1 for p in path.rglob("*") if p.is_file())
    click.echo(f"results of {task.id} ({task.state.value}): {files} file(s) in {path}")


@tasks.command("register-model")
@click.argument("task_ref", metavar="TASK")
@click.option("--name", help="The model's name (default: the task's name).")
def register_model(task_ref: str, name: str | None) -> None:
    """Register a SUCCEEDED task's results as a model (then mount it with model_id)."""
    model = _task(task_ref).register_model(name=name)
    click.echo(
        f"model {model.id} ({model.name}): {model.file_count} files, "
        f"{size(model.total_bytes)}, checksum {model.checksum}"
    )


@tasks.command("rm")
@click.argument("task_refs", metavar="TASK...", nargs=-1, required=True)
def remove(task_refs: tuple[str, ...]) -> None:
    """Remove finished tasks: their records, logs and results (registered models stay)."""
    for ref in task_refs:
        task = _task(ref)
        task.delete()
        click.echo(f"removed {task.id}")
