"""``anylearn quota ls``."""

from __future__ import annotations

import click

from anylearn_sdk.cli.output import emit, json_option
from anylearn_sdk.session import get_context

RESOURCES = (("cpu", "cpu"), ("memory_mb", "mem MiB"), ("gpu", "gpu"))


def _amounts(amounts: dict) -> str:
    return ", ".join(f"{label} {amounts.get(key, 0):g}" for key, label in RESOURCES)


@click.group()
def quota() -> None:
    """Quota groups: the capacity pools tasks wait in, oldest first."""


@quota.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List quota groups: capacity, what running tasks hold, and how many tasks wait."""
    columns = (
        ("name", lambda g: g["name"]),
        ("capacity", lambda g: _amounts(g["capacity"])),
        ("allocated", lambda g: _amounts(g.get("allocated", {}))),
        ("running", lambda g: g.get("running", 0)),
        ("queued", lambda g: g.get("queued", 0)),
        ("default request", lambda g: _amounts(g["default_request"])),
    )
    emit(get_context().api.get_json("/quota-groups"), columns, as_json)
