"""``anylearn datasets preview``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from anylearn_sdk.sync import preview_dataset


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@click.group()
def datasets() -> None:
    """Datasets: versions of data folders, addressed by content."""


@datasets.command("preview")
@click.argument("path", type=click.Path(exists=True))
@click.option("--top", default=10, show_default=True, help="How many of the biggest files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def preview(path: str, top: int, as_json: bool) -> None:
    """What uploading PATH (a folder, zip or tar) would send now; creates nothing.

    Applies the ignore rules (.anylearnignore, .gitignore, default excludes), hashes only what
    the caches cannot vouch for, and asks the server which contents it lacks.
    """
    kwargs = {"dataset_dir": path} if Path(path).is_dir() else {"dataset_archive": path}
    result = preview_dataset(top=top, **kwargs)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    console = Console()
    console.print(
        f"{result.root}: {result.file_count} files, {_size(result.total_bytes)} "
        f"(checksum {result.checksum[:12]})"
    )
    if result.known_id:
        console.print(f"already on the server as {result.known_id}: nothing to upload")
    else:
        console.print(f"would upload {result.upload_files} files, {_size(result.upload_bytes)}")
    table = Table("biggest files", "size")
    for name, size in result.biggest:
        table.add_row(name, _size(size))
    console.print(table)
