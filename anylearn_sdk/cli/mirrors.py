"""``anylearn mirrors add|ls``."""

from __future__ import annotations

import click

from anylearn_sdk.cli.output import emit, json_option
from anylearn_sdk.session import get_context


@click.group()
def mirrors() -> None:
    """Runtime environments (Python interpreters) tasks run with."""


@mirrors.command("add")
@click.argument("name")
@click.option(
    "--python", "python", required=True, help="Absolute path of the interpreter on the server."
)
def add(name: str, python: str) -> None:
    """Add a mirror (admin only)."""
    data = get_context().api.post_json("/mirrors", {"name": name, "python": python})
    click.echo(f"mirror {data['name']} added ({data['python']})")


@mirrors.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List mirrors: name and the interpreter on the server."""
    columns = (("name", lambda r: r["name"]), ("python", lambda r: r["python"]))
    emit(get_context().api.get_json("/mirrors"), columns, as_json)
