"""How every listing prints: a table that fits the terminal for people, ``--json`` for scripts.

Tables never cut an id (people copy them) and never wrap a row: when the terminal is too
narrow, the widest column that may be cut is shortened, with an ellipsis, one cell at a time,
each down to a minimum; if that is not enough, columns are left out, the flexible one (a log
line) first. ``--json`` prints every field, whatever the width.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
from pydantic import BaseModel
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the records as one JSON array instead."
)
#: Cells between two columns: a space of padding each side of the (blank) column divider.
GAP = 3
STATE_STYLES = {
    "SUCCEEDED": "green",
    "READY": "green",
    "FAILED": "red",
    "ERROR": "red",
    "CANCELLED": "yellow",
    "RUNNING": "cyan",
    "UPLOADING": "cyan",
    "QUEUED": "blue",
}


@dataclass(frozen=True)
class Col:
    """A table column.

    Attributes:
        header: its title.
        value: what a record shows in it (a string or a rich ``Text``).
        key: an id (or a short value): shown whole, whatever the width.
        flex: the first column left out when shortening is not enough (one per table).
        min_width: what it may be shortened to.
    """

    header: str
    value: Callable[[Any], str | Text]
    key: bool = False
    flex: bool = False
    min_width: int = 5


def size(n: int | None) -> str:
    """Bytes for people: ``812 B``, ``1.5 MiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns at GiB


def when(moment: datetime | None) -> str:
    """A timestamp for people: ``2026-12-01 09:30:12`` in UTC, ``-`` when unknown."""
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def state_text(state: str) -> Text:
    return Text(str(state), style=STATE_STYLES.get(str(state), "white"))


def fit(natural: list[int], columns: Sequence[Col], available: int) -> list[int]:
    """Column widths that fit ``available`` cells, gaps included: ``key`` columns keep their
    ``natural`` width; the widest of the others gives way, one cell at a time (the ``flex``
    one on a tie), down to their ``min_width``. If that is still too wide, columns are left out
    (0), the flexible one first, then from the right, so the ids still show whole."""
    widths = list(natural)

    def excess() -> int:
        shown = [w for w in widths if w]
        return sum(shown) + GAP * (len(shown) - 1) - available

    over = excess()
    while over > 0:
        shrinkable = [
            i
            for i, c in enumerate(columns)
            if not c.key and widths[i] > min(c.min_width, natural[i])
        ]
        if not shrinkable:
            break
        i = max(shrinkable, key=lambda j: (widths[j], columns[j].flex))
        widths[i] -= 1
        over -= 1
    droppable = [i for i, c in enumerate(columns) if not c.key]
    droppable.sort(key=lambda i: (not columns[i].flex, -i))
    for i in droppable:
        if excess() <= 0:
            break
        widths[i] = 0
    return widths


def _cell(value: str | Text) -> Text:
    """A cell shown as is: text from the server (a log line with ``[anylearn]`` or ``[bold]``
    in it) is never read as rich markup."""
    return value if isinstance(value, Text) else Text(str(value))


def table(columns: Sequence[Col], rows: Sequence[Any], width: int, caption: str = "") -> Table:
    """``rows`` as a table of ``columns`` at most ``width`` cells wide (see the module)."""
    cells = [[_cell(col.value(row)) for col in columns] for row in rows]
    natural = [
        max([cell_len(col.header), *(r[i].cell_len for r in cells)])
        for i, col in enumerate(columns)
    ]
    widths = fit(natural, columns, width)
    shown = [i for i, w in enumerate(widths) if w]
    out = Table(
        *(
            Column(columns[i].header, width=widths[i], no_wrap=True, overflow="ellipsis")
            for i in shown
        ),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        caption=caption or None,
        caption_justify="left",
    )
    for row in cells:
        out.add_row(*(row[i] for i in shown))
    return out


def to_json(rows: Sequence[BaseModel] | BaseModel) -> str:
    if isinstance(rows, BaseModel):
        return json.dumps(rows.model_dump(mode="json"), indent=2)
    return json.dumps([r.model_dump(mode="json") for r in rows], indent=2)


def emit(rows: Sequence[BaseModel], columns: Sequence[Col], json_wanted: bool) -> None:
    """Print ``rows`` as one JSON array (``--json``) or as a table of ``columns``."""
    if json_wanted:
        click.echo(to_json(rows))
        return
    console = Console()
    console.print(table(columns, rows, console.width))
