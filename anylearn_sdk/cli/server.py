"""``anylearn server start|stop|status``: the local backend the SDK also uses."""

from __future__ import annotations

from pathlib import Path

import click

from anylearn_sdk import local_backend
from anylearn_sdk.config import anylearn_home
from anylearn_sdk.datadir import AlreadyRunningError


def _data_dir(data_dir: Path | None) -> Path:
    return data_dir.resolve() if data_dir else local_backend.data_dir_for(anylearn_home())


@click.group()
def server() -> None:
    """Manage the local backend (data under ANYLEARN_HOME/server by default)."""


@server.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port; 0 reuses the last one if free, else picks a free one.",
)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Where the backend keeps its data."
)
@click.option("--detach", is_flag=True, help="Run in the background and return once it answers.")
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=None,
    help="Re-runs of a task whose processes were lost (server or machine restart); default 2.",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=None,
    help="GPUs tasks may be given (default: as many as `nvidia-smi -L` lists).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where tasks run: processes on this machine (default), or a Ray cluster.",
)
@click.option(
    "--ray-address",
    default=None,
    help="The Ray cluster for --executor ray: auto (default), HOST:PORT or ray://HOST:PORT.",
)
@click.option(
    "--ray-node-cache",
    default=None,
    help="Where each Ray node caches code, data and environments (as <it>/<node id>).",
)
@click.option(
    "--database-url",
    default=None,
    help="postgresql://USER@HOST:PORT/DB (password in PGPASSWORD or ~/.pgpass); "
    "default: SQLite in the data folder.",
)
@click.option(
    "--build-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds an environment build step (venv, pip install) may run; default 1800.",
)
def start(
    host: str,
    port: int,
    data_dir: Path | None,
    detach: bool,
    max_restarts: int | None,
    gpus: int | None,
    build_timeout: float | None,
    executor: str | None,
    ray_address: str | None,
    ray_node_cache: str | None,
    database_url: str | None,
) -> None:
    """Start the backend (in the foreground unless --detach).

    A data folder has one server at most: a second start on it is refused, naming the running
    one. Port 0 reuses the port the folder's last server listened on when it is free.
    """
    folder = _data_dir(data_dir)
    options: list[str] = []
    for name, value in (
        ("--max-restarts", max_restarts),
        ("--gpus", gpus),
        ("--build-timeout", build_timeout),
        ("--executor", executor),
        ("--ray-address", ray_address),
        ("--ray-node-cache", ray_node_cache),
        ("--database-url", database_url),
    ):
        options += [] if value is None else [name, str(value)]
    if detach:
        running = local_backend.status(folder)
        if running.running:
            raise AlreadyRunningError(folder, running.pid, running.url)
        status = local_backend.start(folder, host=host, port=port, options=options)
        click.echo(f"backend running at {status.url} (pid {status.pid}, data {folder})")
        return
    local_backend.require_server_extra()
    from anylearn_sdk.server.runner import main

    main(["--host", host, "--port", str(port), "--data-dir", str(folder), *options])


@server.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="The backend's data folder.")
def stop(data_dir: Path | None) -> None:
    """Stop the backend."""
    folder = _data_dir(data_dir)
    pid = local_backend.stop(folder)
    click.echo(f"stopped (pid {pid})" if pid else f"not running (data {folder})")


@server.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="The backend's data folder.")
def status(data_dir: Path | None) -> None:
    """Show whether the backend runs, and where."""
    st = local_backend.status(_data_dir(data_dir))
    if st.running:
        where = f"at {st.url}" if st.ready else "(its address is not published yet)"
        click.echo(f"running {where} (pid {st.pid}, data {st.data_dir})")
    else:
        click.echo(f"not running (data {st.data_dir})")
        raise SystemExit(3)
