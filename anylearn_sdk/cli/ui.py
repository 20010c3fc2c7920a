"""``anylearn ui``: open the current backend's web page."""

from __future__ import annotations

import webbrowser

import click

from anylearn_sdk import local_backend
from anylearn_sdk.session import get_context


@click.command()
@click.option("--no-browser", is_flag=True, help="Only print the address.")
def ui(no_browser: bool) -> None:
    """Open the web page of the backend the SDK uses (the local one unless configured) in
    the browser: tasks with live logs and metric charts, comparison, data and quota groups.
    Prints the address where no browser can be opened. Sign in there with your username and
    password, or with a token (``anylearn tokens create``)."""
    ctx = get_context()
    url = ctx.settings.host.rstrip("/") + "/"
    opened = False if no_browser else webbrowser.open(url)
    click.echo(f"{'opened' if opened else 'open'} {url}")
    if ctx.settings.embedded:
        credentials = local_backend.data_dir_for(ctx.settings.home) / "admin-credentials.json"
        click.echo(f"the local backend's user is admin; its password is in {credentials}")
