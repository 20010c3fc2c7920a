"""``anylearn quota ls|add|set|rm``: the capacity pools tasks wait in."""

from __future__ import annotations

import click

from anylearn_sdk.cli.output import Col, emit, json_option
from anylearn_sdk.resources.runtime import (
    add_quota_group,
    list_quota_groups,
    remove_quota_group,
    set_quota_group,
)
from anylearn_sdk.wire import Amounts


def _of(used: float, capacity: float) -> str:
    return f"{used:g}/{capacity:g}"


def _request(amounts: Amounts) -> str:
    return f"{amounts.cpu:g} cpu, {amounts.memory_mb} MiB, {amounts.gpu} gpu"


QUOTA_COLUMNS = (
    Col("name", lambda g: g.name, key=True),
    Col("cpu", lambda g: _of(g.allocated.cpu, g.capacity.cpu), key=True),
    Col("memory MiB", lambda g: _of(g.allocated.memory_mb, g.capacity.memory_mb), key=True),
    Col("gpu", lambda g: _of(g.allocated.gpu, g.capacity.gpu), key=True),
    Col("running", lambda g: str(g.running), key=True),
    Col("queued", lambda g: str(g.queued), key=True),
    Col("default request", lambda g: _request(g.default_request), flex=True, min_width=10),
)

_amount_options = (
    click.option("--cpu", type=click.FloatRange(min=0), help="Cores (may be fractional)."),
    click.option("--memory-mb", type=click.IntRange(min=0), help="Memory, MiB."),
    click.option("--gpu", type=click.IntRange(min=0), help="Whole GPUs."),
    click.option(
        "--default-cpu", type=click.FloatRange(min=0), help="Cores a task gets by default."
    ),
    click.option(
        "--default-memory-mb", type=click.IntRange(min=0), help="MiB a task gets by default."
    ),
    click.option("--default-gpu", type=click.IntRange(min=0), help="GPUs a task gets by default."),
)


def amount_options(command):
    for option in reversed(_amount_options):
        command = option(command)
    return command


def _given(**values: float | None) -> dict | None:
    given = {k: v for k, v in values.items() if v is not None}
    return given or None


@click.group()
def quota() -> None:
    """Quota groups: the capacity pools tasks wait in, oldest first."""


@quota.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List quota groups: what running tasks hold of each capacity (used/capacity), running
    and queued tasks, and the default request."""
    emit(list_quota_groups(), QUOTA_COLUMNS, as_json)


@quota.command("add")
@click.argument("name")
@amount_options
def add(name: str, **amounts: float | None) -> None:
    """Add a quota group NAME (admin only); capacities left out are 0, the default request
    one core."""
    group = add_quota_group(
        name,
        _given(cpu=amounts["cpu"], memory_mb=amounts["memory_mb"], gpu=amounts["gpu"]) or {},
        _given(
            cpu=amounts["default_cpu"],
            memory_mb=amounts["default_memory_mb"],
            gpu=amounts["default_gpu"],
        ),
    )
    click.echo(f"quota group {group.name} added: {_request(group.capacity)}")


@quota.command("set")
@click.argument("name")
@amount_options
def set_(name: str, **amounts: float | None) -> None:
    """Change quota group NAME (admin only): the capacities and defaults given; the rest stay.

    Running tasks keep what they hold; queued ones are admitted against the new capacity.
    """
    capacity = _given(cpu=amounts["cpu"], memory_mb=amounts["memory_mb"], gpu=amounts["gpu"])
    default = _given(
        cpu=amounts["default_cpu"],
        memory_mb=amounts["default_memory_mb"],
        gpu=amounts["default_gpu"],
    )
    if capacity is None and default is None:
        raise click.UsageError("give at least one of the amount options")
    group = set_quota_group(name, capacity=capacity, default_request=default)
    click.echo(
        f"quota group {group.name}: capacity {_request(group.capacity)}; "
        f"default request {_request(group.default_request)}"
    )


@quota.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Remove quota group NAME (admin only); refused while tasks are queued or running in it."""
    remove_quota_group(name)
    click.echo(f"quota group {name} removed")
