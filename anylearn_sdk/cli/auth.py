"""``anylearn login``."""

from __future__ import annotations

import click

from anylearn_sdk.session import login as sdk_login


@click.command()
@click.option("--host", required=True, help="Backend URL, for example http://10.0.0.5:8080.")
@click.option("--username", help="User name (prompted for when neither it nor --token is given).")
@click.option("--password", help="Password (prompted for, hidden, when omitted).")
@click.option("--token", help="Use an existing token instead of a password.")
def login(host: str, username: str | None, password: str | None, token: str | None) -> None:
    """Log in to a backend and make it the default (token saved with mode 0600)."""
    if token is None:
        username = username or click.prompt("Username")
        password = password or click.prompt("Password", hide_input=True)
    user = sdk_login(host, username, password, token=token)
    click.echo(f"logged in to {host} as {user.username}")
