"""``anylearn mirrors add|set|ls``."""

from __future__ import annotations

import click

from anylearn_sdk.cli.output import Col, emit, json_option
from anylearn_sdk.resources.runtime import add_mirror, list_mirrors, set_mirror

MIRROR_COLUMNS = (
    Col("name", lambda m: m.name, key=True),
    Col("python", lambda m: m.python, flex=True, min_width=10),
)


@click.group()
def mirrors() -> None:
    """Runtime environments (Python interpreters) tasks run with."""


#: ``--python PATH`` of ``mirrors add`` and ``mirrors set``.
python_option = click.option(
    "--python", "python", required=True, help="Absolute path of the interpreter on the server."
)


@mirrors.command("add")
@click.argument("name")
@python_option
def add(name: str, python: str) -> None:
    """Add a mirror (admin only)."""
    mirror = add_mirror(name, python)
    click.echo(f"mirror {mirror.name} added ({mirror.python})")


@mirrors.command("set")
@click.argument("name")
@python_option
def set_(name: str, python: str) -> None:
    """Point a mirror at another interpreter (admin only); tasks started afterwards use it."""
    mirror = set_mirror(name, python)
    click.echo(f"mirror {mirror.name} now runs {mirror.python}")


@mirrors.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List mirrors: name and the interpreter on the server."""
    emit(list_mirrors(), MIRROR_COLUMNS, as_json)
