"""``anylearn datasets ls|preview`` and ``anylearn models ls``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from anylearn_sdk.cli.output import emit, json_option, size
from anylearn_sdk.session import get_context
from anylearn_sdk.sync import preview_dataset

#: Columns of ``datasets ls`` and ``models ls``.
RESOURCE_COLUMNS = (
    ("id", lambda r: r["id"]),
    ("name", lambda r: r["name"]),
    ("state", lambda r: r["state"]),
    ("files", lambda r: r["file_count"]),
    ("size", lambda r: size(r["total_bytes"])),
    ("checksum", lambda r: r["checksum"][:16]),
    ("created", lambda r: r["created_at"][:19].replace("T", " ")),
)


@click.group()
def datasets() -> None:
    """Datasets: versions of data folders, addressed by content."""


@datasets.command("ls")
@json_option
def datasets_ls(as_json: bool) -> None:
    """List your dataset versions: id, name, state, files, size, checksum, created."""
    emit(get_context().api.get_json("/datasets"), RESOURCE_COLUMNS, as_json)


@click.group()
def models() -> None:
    """Models: versions of model folders and registered task results, addressed by content."""


@models.command("ls")
@json_option
def models_ls(as_json: bool) -> None:
    """List your model versions: id, name, state, files, size, checksum, created."""
    emit(get_context().api.get_json("/models"), RESOURCE_COLUMNS, as_json)


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
        f"{result.root}: {result.file_count} files, {size(result.total_bytes)} "
        f"(checksum {result.checksum[:12]})"
    )
    if result.known_id:
        console.print(f"already on the server as {result.known_id}: nothing to upload")
    else:
        console.print(f"would upload {result.upload_files} files, {size(result.upload_bytes)}")
    table = Table("biggest files", "size")
    for name, nbytes in result.biggest:
        table.add_row(name, size(nbytes))
    console.print(table)
