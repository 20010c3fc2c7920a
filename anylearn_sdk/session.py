"""The SDK's current connection: :func:`init_sdk` sets it, everything else reads it.

Settings resolve argument > environment (``ANYLEARN_HOST``, ``ANYLEARN_TOKEN``,
``ANYLEARN_HOME``) > config file (``anylearn login``) > the embedded local backend, which is
started on 127.0.0.1 when nothing else is configured (see :mod:`anylearn_sdk.local_backend`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property

from anylearn_sdk import local_backend
from anylearn_sdk.client.http import ApiClient
from anylearn_sdk.config import (
    Settings,
    anylearn_home,
    configured_host,
    normalize_host,
    stored_token,
)
from anylearn_sdk.errors import AnylearnError, ConfigurationError
from anylearn_sdk.store import LocalStore


@dataclass
class SdkContext:
    """A resolved connection: settings, API client, the server's identity, the local store.

    Attributes:
        settings: the resolved :class:`~anylearn_sdk.config.Settings`.
        api: the HTTP client.
        server_id: the backend's stable identity (survives restarts and port changes); rows
            of the local store are keyed by it.
    """

    settings: Settings
    api: ApiClient = field(repr=False)
    server_id: str

    @cached_property
    def store(self) -> LocalStore:
        return LocalStore(self.settings.home)


_current: SdkContext | None = None
_lock = threading.Lock()


def login(host: str, username: str, password: str) -> str:
    """Exchange a username and password for a token at ``host``.

    Raises:
        AuthenticationError: wrong username or password.
    """
    api = ApiClient(host, None)
    return api.post_json("/auth/login", {"username": username, "password": password})["token"]


def resolve_settings(
    cluster_address: str | None = None,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
) -> Settings:
    """Resolve settings (see the module docstring); may start the embedded local backend.

    Raises:
        ConfigurationError: a bad address, a username without a password, or no token found.
        AuthenticationError: ``username``/``password`` were rejected.
        LocalBackendError: the embedded backend was needed and did not start.
    """
    home = anylearn_home()
    if (username is None) != (password is None) and token is None:
        raise ConfigurationError("give both username and password, or a token")
    host = normalize_host(cluster_address) if cluster_address else configured_host(home)
    embedded = host is None
    if embedded:
        host = local_backend.start(local_backend.data_dir_for(home)).url
    if token is None and username is not None and password is not None:
        token = login(host, username, password)
    if token is None:
        token = os.environ.get("ANYLEARN_TOKEN") or None
    if token is None:
        token, saved_user = stored_token(home, host)
        username = username or saved_user
    if token is None and embedded:
        token = local_backend.admin_token(local_backend.data_dir_for(home))
    if token is None:
        raise ConfigurationError(
            f"no token for {host}: run `anylearn login --host {host}` or set ANYLEARN_TOKEN"
        )
    return Settings(host=host, token=token, home=home, username=username, embedded=embedded)


def connect(settings: Settings) -> SdkContext:
    api = ApiClient(settings.host, settings.token)
    health = api.get_json("/health")
    api.get_json("/users/me")  # fail now, with a clear 401, if the token is wrong
    return SdkContext(settings=settings, api=api, server_id=health["server_id"])


def init_sdk(
    cluster_address: str | None = None,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
) -> SdkContext:
    """Connect the SDK to a backend; later calls use this connection.

    Args:
        cluster_address: the backend URL (``http://host:port``); None uses ``ANYLEARN_HOST``,
            then the config file, then the embedded local backend.
        username: with ``password``, log in for a new token.
        password: the user's password.
        token: a bearer token (takes precedence over username/password).

    Returns:
        The :class:`SdkContext` now current.

    Raises:
        ConfigurationError, AuthenticationError, LocalBackendError: see
            :func:`resolve_settings`.

    Example:
        >>> init_sdk("http://127.0.0.1:8080", username="alice", password="...")  # doctest: +SKIP
    """
    global _current
    ctx = connect(resolve_settings(cluster_address, username, password, token))
    with _lock:
        _current = ctx
    return ctx


def get_context() -> SdkContext:
    """The current connection, resolving one from environment and config if none was set."""
    global _current
    with _lock:
        if _current is not None:
            return _current
    ctx = connect(resolve_settings())
    with _lock:
        if _current is None:
            _current = ctx
        return _current


def reset() -> None:
    """Forget the current connection (tests, or after changing the environment)."""
    global _current
    with _lock:
        _current = None


def server_id_of(host: str) -> str | None:
    """The ``server_id`` a backend reports on ``/health``, or None if it cannot be reached."""
    try:
        return ApiClient(host, None).get_json("/health", retry=False, timeout=(3.0, 5.0))[
            "server_id"
        ]
    except (AnylearnError, KeyError, ValueError):
        return None
