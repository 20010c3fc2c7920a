"""``anylearn tasks``: list, watch, follow logs, cancel, download."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table

from anylearn_sdk.resources.train_task import TrainTask
from anylearn_sdk.session import get_context
from anylearn_sdk.states import TaskState

STATE_STYLES = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "RUNNING": "cyan",
    "QUEUED": "blue",
}
EXIT_TASK_FAILED = 3


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _duration(task: dict, now: datetime) -> str:
    start = _parse(task.get("started_at"))
    if start is None:
        return "-"
    end = _parse(task.get("finished_at")) or now
    seconds = int((end - start).total_seconds())
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render(rows: list[dict]) -> Table:
    """The task table: id, name, state, created, duration."""
    now = datetime.now(UTC)
    table = Table(
        Column("id", no_wrap=True, min_width=max((len(t["id"]) for t in rows), default=2)),
        Column("name", overflow="ellipsis", no_wrap=True, max_width=20),
        Column("state", no_wrap=True, min_width=9),
        Column("created", no_wrap=True, min_width=14),
        Column("duration", no_wrap=True, min_width=8),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for t in rows:
        created = _parse(t["created_at"])
        table.add_row(
            t["id"],
            t["name"],
            f"[{STATE_STYLES.get(t['state'], 'white')}]{t['state']}[/]",
            created.astimezone().strftime("%m-%d %H:%M:%S") if created else "-",
            _duration(t, now),
        )
    return table


@click.group(invoke_without_command=True)
@click.option("--watch", is_flag=True, help="Refresh in place until every shown task is terminal.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.pass_context
def tasks(ctx: click.Context, watch: bool, interval: float) -> None:
    """List your train tasks (id, name, state, created, duration)."""
    if ctx.invoked_subcommand is not None:
        return
    api = get_context().api
    rows = api.get_json("/train-tasks")
    console = Console()
    if not watch:
        console.print(render(rows))
        return
    ids = ",".join(t["id"] for t in rows)
    with Live(render(rows), console=console, auto_refresh=False) as live:
        while not all(TaskState(t["state"]).is_terminal for t in rows):
            time.sleep(interval)
            rows = api.get_json("/train-tasks", params={"ids": ids} if ids else None)
            live.update(render(rows), refresh=True)
    if any(t["state"] in ("FAILED", "CANCELLED") for t in rows):
        sys.exit(EXIT_TASK_FAILED)


@tasks.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task ends.")
def logs(task_id: str, follow: bool) -> None:
    """Print a task's log."""
    task = TrainTask(task_id, context=get_context())
    if follow:
        for text in task.stream_logs():
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
@click.argument("task_id")
def cancel(task_id: str) -> None:
    """Cancel a queued or running task."""
    state = TrainTask(task_id, context=get_context()).cancel()
    click.echo(f"{task_id}: {state.value}")


@tasks.command()
@click.argument("task_id")
@click.argument("dest", type=click.Path(path_type=Path))
def download(task_id: str, dest: Path) -> None:
    """Download a task's results into DEST."""
    path = TrainTask(task_id, context=get_context()).download_results(dest)
    click.echo(f"results of {task_id} in {path}")
