"""Entry point of ``anylearn``.

Every error is one line on stderr (``Error: ...``) and an exit code from :data:`EXIT_CODES`;
``anylearn --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from anylearn_sdk import session
from anylearn_sdk._version import __version__
from anylearn_sdk.cli.admin import tokens, users
from anylearn_sdk.cli.auth import login
from anylearn_sdk.cli.datasets import datasets, models
from anylearn_sdk.cli.mirrors import mirrors
from anylearn_sdk.cli.quota import quota
from anylearn_sdk.cli.server import server
from anylearn_sdk.cli.tasks import tasks
from anylearn_sdk.cli.ui import ui
from anylearn_sdk.datadir import AlreadyRunningError
from anylearn_sdk.errors import AnylearnError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TASK_FAILED = 3
EXIT_INTERRUPTED = 130
#: Exit code → meaning; docs/cli.md shows the same table.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "an error: one line on stderr (`Error: ...`)",
    EXIT_USAGE: "bad usage: an unknown option, a missing or invalid argument",
    EXIT_TASK_FAILED: "`tasks --watch`: a watched task ended FAILED or CANCELLED; "
    "`server status`: not running",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """The boundary: library errors, usage errors and OS errors become one line and an exit
    code; ``--debug`` re-raises instead."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        standalone = extra.pop("standalone_mode", True)
        if not standalone:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        argv = sys.argv[1:] if args is None else list(args)
        debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
        session.reset()  # each command resolves its settings afresh, as a new process would
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            if debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.UsageError as err:
            if debug:
                raise
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            _fail(f"{err.format_message()}{hint}", EXIT_USAGE)
        except click.ClickException as err:
            if debug:
                raise
            _fail(err.format_message(), err.exit_code)
        except (AnylearnError, AlreadyRunningError, OSError) as err:
            if debug:
                raise
            _fail(str(err) or type(err).__name__, EXIT_ERROR)
        sys.exit(result if isinstance(result, int) else EXIT_OK)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="anylearn")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Send training jobs to an anylearn backend and follow them."""


for _command in (login, tasks, server, mirrors, datasets, models, quota, users, tokens, ui):
    cli.add_command(_command)
