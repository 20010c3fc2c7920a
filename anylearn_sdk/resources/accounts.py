"""Users and tokens: who you are, your tokens, and (for admins) the users of a backend."""

from __future__ import annotations

from anylearn_sdk.client.http import make_body
from anylearn_sdk.session import SdkContext, get_context
from anylearn_sdk.wire import NewToken, NewTokenResult, NewUser, TokenRecord, UserRecord


class User(UserRecord):
    """A user of the backend: ``id``, ``username``, ``is_admin``, ``created_at``."""


class Token(TokenRecord):
    """A token of yours, without its secret: ``id``, ``name``, ``created_at``, ``expires_at``."""


class NewTokenSecret(NewTokenResult):
    """A token just created; ``token`` is its secret, shown this once."""


def whoami(*, context: SdkContext | None = None) -> User:
    """The user the current token belongs to."""
    ctx = context or get_context()
    return ctx.api.call("GET", "/users/me", User)


def list_users(*, context: SdkContext | None = None) -> list[User]:
    """Every user of the backend, oldest first (admin only).

    Raises:
        PermissionDeniedError: the caller is not an admin.
    """
    ctx = context or get_context()
    return ctx.api.call("GET", "/users", list[User])


def add_user(
    username: str, password: str, *, is_admin: bool = False, context: SdkContext | None = None
) -> User:
    """Create a user with a default project (admin only); they log in with ``anylearn login``.

    Raises:
        InvalidArgumentError: a username outside ``[A-Za-z0-9._-]`` or a password shorter
            than 8 characters.
        ConflictError: the username is taken.
        PermissionDeniedError: the caller is not an admin.
    """
    body = make_body(NewUser, username=username, password=password, is_admin=is_admin)
    ctx = context or get_context()
    return ctx.api.call("POST", "/users", User, body)


def remove_user(username: str, *, context: SdkContext | None = None) -> None:
    """Remove a user and everything they own on the backend (admin only).

    Raises:
        ConflictError: one of their tasks is queued or running.
        NotFoundError: no such user.
    """
    ctx = context or get_context()
    ctx.api.request("DELETE", f"/users/{username}", resource_id=username)


def create_token(
    name: str = "", *, expires_in: int | None = None, context: SdkContext | None = None
) -> NewTokenSecret:
    """A new token for the current user, for a script or CI (``ANYLEARN_TOKEN``).

    Args:
        name: a label to recognise it by in :func:`list_tokens`.
        expires_in: seconds it stays valid; None: until revoked.

    Returns:
        The token, with its secret in ``token`` (shown only this once).
    """
    body = make_body(NewToken, name=name, expires_in=expires_in)
    ctx = context or get_context()
    return ctx.api.call("POST", "/tokens", NewTokenSecret, body)


def list_tokens(*, context: SdkContext | None = None) -> list[Token]:
    """The current user's tokens, oldest first, without their secrets."""
    ctx = context or get_context()
    return ctx.api.call("GET", "/tokens", list[Token])


def revoke_token(token_id: int, *, context: SdkContext | None = None) -> None:
    """Revoke one of the current user's tokens; it is refused from then on.

    Raises:
        NotFoundError: no such token of yours.
    """
    ctx = context or get_context()
    ctx.api.request("DELETE", f"/tokens/{int(token_id)}", resource_id=token_id)
