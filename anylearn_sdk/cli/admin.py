"""``anylearn users add|ls|rm`` (admins) and ``anylearn tokens create|ls|revoke``."""

from __future__ import annotations

import re

import click

from anylearn_sdk.cli.output import Col, emit, json_option, to_json, when
from anylearn_sdk.resources.accounts import (
    add_user,
    create_token,
    list_tokens,
    list_users,
    remove_user,
    revoke_token,
)

USER_COLUMNS = (
    Col("username", lambda u: u.username, key=True),
    Col("id", lambda u: u.id, key=True),
    Col("admin", lambda u: "yes" if u.is_admin else "no", key=True),
    Col("created", lambda u: when(u.created_at), min_width=10),
)
TOKEN_COLUMNS = (
    Col("id", lambda t: str(t.id), key=True),
    Col("name", lambda t: t.name or "-", flex=True, min_width=6),
    Col("created", lambda t: when(t.created_at), min_width=10),
    Col("expires", lambda t: when(t.expires_at) if t.expires_at else "never", min_width=10),
)
_DURATION = re.compile(r"(?P<n>\d+)(?P<unit>[smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType):
    """``90d``, ``12h``, ``30m``, ``2w``, ``3600s`` → seconds."""

    name = "duration"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = _DURATION.fullmatch(str(value).strip())
        if not match or int(match["n"]) == 0:
            self.fail(f"{value!r} is not a duration such as 90d, 12h, 30m, 2w", param, ctx)
        return int(match["n"]) * _SECONDS[match["unit"]]


@click.group()
def users() -> None:
    """Users of the backend (admin only). A new user logs in with `anylearn login`."""


@users.command("ls")
@json_option
def users_ls(as_json: bool) -> None:
    """List users: username, id, admin, created."""
    emit(list_users(), USER_COLUMNS, as_json)


@users.command("add")
@click.argument("username")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="At least 8 characters (prompted for, hidden, when left out).",
)
@click.option("--admin", "is_admin", is_flag=True, help="Make the user an admin.")
def users_add(username: str, password: str, is_admin: bool) -> None:
    """Add user USERNAME, with a default project."""
    user = add_user(username, password, is_admin=is_admin)
    role = "admin" if user.is_admin else "user"
    click.echo(f"{role} {user.username} added ({user.id}); they log in with `anylearn login`")


@users.command("rm")
@click.argument("username")
@click.confirmation_option(prompt="Remove the user and everything they own?")
def users_rm(username: str) -> None:
    """Remove USERNAME and everything they own (refused while one of their tasks is live)."""
    remove_user(username)
    click.echo(f"user {username} removed")


@click.group()
def tokens() -> None:
    """Your API tokens, for scripts and CI (ANYLEARN_TOKEN)."""


@tokens.command("create")
@click.option("--name", default="", help="A label to recognise it by.")
@click.option("--expires", type=Duration(), help="Lifetime such as 90d, 12h (default: never).")
@json_option
def tokens_create(name: str, expires: int | None, as_json: bool) -> None:
    """Create a token; its secret is printed this once."""
    token = create_token(name, expires_in=expires)
    if as_json:
        click.echo(to_json(token))
        return
    until = when(token.expires_at) if token.expires_at else "never"
    click.echo(f"token {token.id} (expires {until}); store it now, it is not shown again:")
    click.echo(token.token)


@tokens.command("ls")
@json_option
def tokens_ls(as_json: bool) -> None:
    """List your tokens (without their secrets): id, name, created, expires."""
    emit(list_tokens(), TOKEN_COLUMNS, as_json)


@tokens.command("revoke")
@click.argument("token_id", type=int)
def tokens_revoke(token_id: int) -> None:
    """Revoke your token TOKEN_ID; it is refused from then on."""
    revoke_token(token_id)
    click.echo(f"token {token_id} revoked")
