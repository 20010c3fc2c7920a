"""``anylearn tasks``: list and watch, show, logs, cancel, download, register-model, rm.

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

from anylearn_sdk.cli.output import Col, json_option, size, state_text, table, to_json, when
from anylearn_sdk.errors import ServerError
from anylearn_sdk.resources.runtime import list_quota_groups
from anylearn_sdk.resources.train_task import (
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
    """Show a task's whole record: commit, inputs and their checksums, hyperparameters, the
    exact command line, environment, timings, exit code, why it failed, and attempts."""
    task = _task(task_ref).refresh()
    record = task.record
    if as_json:
        click.echo(json.dumps(record.model_dump(mode="json"), indent=2))
        return
    groups = {g.id: g.name for g in list_quota_groups()}
    group = groups.get(record.quota_group_id, record.quota_group_id)
    runtime = record.runtime
    request = record.request.model_dump()
    fields: list[tuple[str, str | Text]] = [
        ("id", record.id),
        ("name", record.name),
        ("state", state_text(record.state)),
        ("error", record.error or "-"),
        ("exit code", "-" if record.exit_code is None else str(record.exit_code)),
        ("attempt", str(record.attempt)),
        ("algorithm", f"{record.algorithm_id} @ {record.commit}"),
        ("entrypoint", record.entrypoint),
        ("hyperparameters", json.dumps(record.hyperparams)),
        ("command", record.command or "-"),
        ("output", record.output),
        ("quota group", f"{group}, request {json.dumps(request)}"),
        ("processes", f"{record.num_nodes} node(s) x {record.nproc_per_node}"),
        ("python", runtime.python or "-"),
        ("environment", runtime.environment or "none (no requirements.txt)"),
        ("gpus", ",".join(map(str, runtime.gpus)) or "-"),
        ("created", when(record.created_at)),
        ("started", when(record.started_at)),
        ("finished", when(record.finished_at)),
        ("elapsed", _elapsed(record.started_at, record.finished_at, datetime.now(UTC))),
    ]
    for item in record.inputs:
        detail = item.id
        if item.checksum is not None:
            detail += (
                f" ({item.name}, {item.file_count} files, {size(item.total_bytes)}, "
                f"checksum {item.checksum})"
            )
        fields.append((f"{item.kind} input", detail))
    env = "\n".join(f"{k}={v}" for k, v in sorted(runtime.env.items()))
    fields.append(("env", env or "-"))
    out = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    out.add_column(style="bold", no_wrap=True)
    out.add_column(overflow="fold")
    for name, value in fields:
        out.add_row(name, value)
    Console().print(out)


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
