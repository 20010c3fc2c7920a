"""Entry point of ``anylearn``. Exit codes: 0 success, 1 an anylearn error (one line on
stderr; ``--debug`` shows the traceback), 2 bad usage, 3 a watched task failed or was
cancelled, 130 interrupted."""

from __future__ import annotations

import sys

import click

from anylearn_sdk import __version__
from anylearn_sdk.cli.auth import login
from anylearn_sdk.cli.datasets import datasets, models
from anylearn_sdk.cli.mirrors import mirrors
from anylearn_sdk.cli.quota import quota
from anylearn_sdk.cli.server import server
from anylearn_sdk.cli.tasks import tasks
from anylearn_sdk.errors import AnylearnError


class _Group(click.Group):
    """Turns library errors into one line and exit code 1, unless --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AnylearnError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="anylearn")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Send training jobs to an anylearn backend and follow them."""
    ctx.obj = {"debug": debug}


cli.add_command(login)
cli.add_command(tasks)
cli.add_command(server)
cli.add_command(mirrors)
cli.add_command(datasets)
cli.add_command(models)
cli.add_command(quota)
