"""``anylearn datasets ls|preview|rm`` and ``anylearn models ls|rm``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from rich.console import Console

from anylearn_sdk.cli.output import Col, emit, json_option, size, state_text, table, when
from anylearn_sdk.resources.dataset import delete_dataset, delete_model, list_datasets, list_models
from anylearn_sdk.sync import preview_dataset

#: Columns of ``datasets ls`` and ``models ls``; ``--json`` has the whole checksum.
RESOURCE_COLUMNS = (
    Col("id", lambda r: r.id, key=True),
    Col("name", lambda r: r.name, flex=True, min_width=8),
    Col("state", lambda r: state_text(r.state), key=True),
    Col("files", lambda r: str(r.file_count), key=True),
    Col("size", lambda r: size(r.total_bytes), key=True),
    Col("checksum", lambda r: r.checksum[:12], min_width=8),
    Col("created", lambda r: when(r.created_at), min_width=10),
)


@click.group()
def datasets() -> None:
    """Datasets: versions of data folders, addressed by content."""


@datasets.command("ls")
@click.option("--name", help="Only versions with this name.")
@json_option
def datasets_ls(name: str | None, as_json: bool) -> None:
    """List your dataset versions: id, name, state, files, size, checksum, created."""
    emit(list_datasets(name=name), RESOURCE_COLUMNS, as_json)


@datasets.command("rm")
@click.argument("refs", metavar="DATASET...", nargs=-1, required=True)
def datasets_rm(refs: tuple[str, ...]) -> None:
    """Delete dataset versions (ids or unique prefixes); refused while a live task mounts one.

    Files shared with other versions stay on the server.
    """
    for ref in refs:
        click.echo(f"deleted {delete_dataset(ref)}")


@click.group()
def models() -> None:
    """Models: versions of model folders and registered task results, addressed by content."""


@models.command("ls")
@click.option("--name", help="Only versions with this name.")
@json_option
def models_ls(name: str | None, as_json: bool) -> None:
    """List your model versions: id, name, state, files, size, checksum, created."""
    emit(list_models(name=name), RESOURCE_COLUMNS, as_json)


@models.command("rm")
@click.argument("refs", metavar="MODEL...", nargs=-1, required=True)
def models_rm(refs: tuple[str, ...]) -> None:
    """Delete model versions (ids or unique prefixes); refused while a live task mounts one."""
    for ref in refs:
        click.echo(f"deleted {delete_model(ref)}")


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
    biggest = [{"path": name, "bytes": nbytes} for name, nbytes in result.biggest]
    columns = (
        Col("biggest files", lambda r: r["path"], flex=True, min_width=10),
        Col("size", lambda r: size(r["bytes"]), key=True),
    )
    console.print(table(columns, biggest, console.width))
