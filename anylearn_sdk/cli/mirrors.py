"""``anylearn mirrors add|ls``."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

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
def ls() -> None:
    """List mirrors."""
    table = Table("name", "python")
    for row in get_context().api.get_json("/mirrors"):
        table.add_row(row["name"], row["python"])
    Console().print(table)
