"""How every listing prints: a rich table for people, ``--json`` for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the records as one JSON array instead."
)

#: (header, how to show a record's value)
Columns = Sequence[tuple[str, Callable[[dict], Any]]]


def size(n: int | None) -> str:
    """Bytes for people: ``812 B``, ``1.5 MiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def table(columns: Columns, rows: list[dict]) -> Table:
    out = Table(*(header for header, _ in columns), box=box.SIMPLE_HEAD, pad_edge=False)
    for row in rows:
        out.add_row(*(str(show(row)) for _, show in columns))
    return out


def emit(rows: list[dict], columns: Columns, as_json: bool) -> None:
    """Print ``rows`` as a JSON array (``--json``) or as a table of ``columns``."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        Console().print(table(columns, rows))
