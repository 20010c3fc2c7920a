"""``anylearn tasks``: list and watch, show, logs, cancel, download, register-model."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

from anylearn_sdk.cli.output import json_option, size
from anylearn_sdk.errors import ServerError
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
#: Exit status of ``anylearn tasks --watch`` when a watched task ended FAILED or CANCELLED.
EXIT_TASK_FAILED = 3
#: Lines a live table leaves for its header and caption.
TABLE_CHROME_LINES = 6


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _elapsed(task: dict, now: datetime) -> str:
    """Run time (start to end, or to now while running); ``-`` before the start."""
    start = _parse(task.get("started_at"))
    if start is None:
        return "-"
    end = _parse(task.get("finished_at")) or now
    seconds = max(0, int((end - start).total_seconds()))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, "white"))


def render(rows: list[dict], max_rows: int | None = None) -> Table:
    """The task table: id, name, state, quota group, elapsed, last log line.

    With ``max_rows``, only the newest that many are shown; the caption counts every task
    by state either way.
    """
    now = datetime.now(UTC)
    shown = rows if max_rows is None else rows[-max_rows:] if max_rows > 0 else []
    counts: dict[str, int] = {}
    for t in rows:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    caption = f"{len(rows)} tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if len(shown) < len(rows):
        caption += f" ({len(rows) - len(shown)} older not shown)"
    table = Table(
        Column("id", no_wrap=True, min_width=max((len(t["id"]) for t in shown), default=2)),
        Column("name", overflow="ellipsis", no_wrap=True, min_width=4, max_width=20),
        Column("state", no_wrap=True, min_width=9),
        Column("quota group", overflow="ellipsis", no_wrap=True, min_width=5, max_width=16),
        Column("elapsed", no_wrap=True, min_width=7),
        Column("last log line", overflow="ellipsis", no_wrap=True, ratio=1),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        expand=True,
        caption=caption,
        caption_justify="left",
    )
    for t in shown:
        table.add_row(
            t["id"],
            t["name"],
            _state(t["state"]),
            t.get("quota_group", ""),
            _elapsed(t, now),
            Text(t.get("last_line", "")),
        )
    return table


def fetch_summary(limit: int, created_from: str | None = None) -> list[dict]:
    """One request: the newest ``limit`` tasks (created at or after ``created_from``)."""
    params: dict[str, str | int] = {"view": "summary", "limit": limit}
    if created_from:
        params["created_from"] = created_from
    return get_context().api.get_json("/train-tasks", params=params)


@click.group(invoke_without_command=True)
@click.option("--watch", is_flag=True, help="Refresh in place until every shown task has ended.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--limit", default=100, show_default=True, help="How many of the newest tasks.")
@json_option
@click.pass_context
def tasks(ctx: click.Context, watch: bool, interval: float, limit: int, as_json: bool) -> None:
    """List your newest train tasks: id, name, state, quota group, elapsed, last log line.

    With --watch the table refreshes in place, one request per refresh, until every task that
    was queued or running has ended; the exit status is 3 if one of them FAILED or was
    CANCELLED.
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = fetch_summary(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    if not watch:
        console.print(render(rows))
        return
    sys.exit(watch_tasks(rows, interval, console))


def watch_tasks(rows: list[dict], interval: float, console: Console) -> int:
    """Refresh ``rows`` in place until the unfinished ones end; returns the exit status."""
    watched = {t["id"] for t in rows if not TaskState(t["state"]).is_terminal}
    since = min((t["created_at"] for t in rows if t["id"] in watched), default=None)
    by_id = {t["id"]: t for t in rows}

    def height() -> int:
        return max(1, console.size.height - TABLE_CHROME_LINES)

    with Live(render(rows, height()), console=console, auto_refresh=False) as live:
        while any(not TaskState(by_id[i]["state"]).is_terminal for i in watched):
            time.sleep(interval)
            for fresh in fetch_summary(10_000, since):
                if fresh["id"] in by_id:
                    by_id[fresh["id"]] = fresh
            rows = [by_id[t["id"]] for t in rows]
            live.update(render(rows, height()), refresh=True)
    failed = [i for i in watched if by_id[i]["state"] in ("FAILED", "CANCELLED")]
    return EXIT_TASK_FAILED if failed else 0


@tasks.command()
@click.argument("task_id")
@json_option
def show(task_id: str, as_json: bool) -> None:
    """Show a task's whole record: commit, inputs and their checksums, hyperparameters, the
    exact command line, environment, timings, exit code and attempts."""
    ctx = get_context()
    data = TrainTask(task_id, load_detail=True, context=ctx).data
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    runtime = data.get("runtime") or {}
    groups = {g["id"]: g["name"] for g in ctx.api.get_json("/quota-groups")}
    group = groups.get(data["quota_group_id"], data["quota_group_id"])
    fields: list[tuple[str, str | Text]] = [
        ("id", data["id"]),
        ("name", data["name"]),
        ("state", _state(data["state"])),
        ("error", data.get("error") or "-"),
        ("exit code", str(data.get("exit_code", "-"))),
        ("attempt", str(data.get("attempt", 1))),
        ("algorithm", f"{data['algorithm_id']} @ {data['commit']}"),
        ("entrypoint", data["entrypoint"]),
        ("hyperparameters", json.dumps(data["hyperparams"])),
        ("command", data.get("command") or "-"),
        ("output", data["output"]),
        ("quota group", f"{group}, request {json.dumps(data['request'])}"),
        ("processes", f"{data['num_nodes']} node(s) x {data['nproc_per_node']}"),
        ("python", runtime.get("python") or "-"),
        ("environment", runtime.get("environment") or "none (no requirements.txt)"),
        ("gpus", ",".join(map(str, runtime.get("gpus") or [])) or "-"),
        ("created", data["created_at"]),
        ("started", data.get("started_at") or "-"),
        ("finished", data.get("finished_at") or "-"),
        ("elapsed", _elapsed(data, datetime.now(UTC))),
    ]
    for item in data.get("inputs", []):
        detail = item["id"]
        if "checksum" in item:
            detail += (
                f" ({item['name']}, {item['file_count']} files, {size(item['total_bytes'])}, "
                f"checksum {item['checksum']})"
            )
        fields.append((f"{item['kind']} input", detail))
    env = runtime.get("env") or {}
    fields.append(("env", "\n".join(f"{k}={v}" for k, v in sorted(env.items())) or "-"))
    table = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in fields:
        table.add_row(name, value)
    Console().print(table)


@tasks.command()
@click.argument("task_id")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing until the task ends; waits through server restarts and network drops.",
)
def logs(task_id: str, follow: bool) -> None:
    """Print a task's log."""
    task = TrainTask(task_id, context=get_context())
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


@tasks.command("register-model")
@click.argument("task_id")
@click.option("--name", help="The model's name (default: the task's name).")
def register_model(task_id: str, name: str | None) -> None:
    """Register a SUCCEEDED task's results as a model (then mount it with model_id)."""
    model = TrainTask(task_id, context=get_context()).register_model(name=name)
    click.echo(
        f"model {model.id} ({model.name}): {model.file_count} files, "
        f"{size(model.total_bytes)}, checksum {model.checksum}"
    )
