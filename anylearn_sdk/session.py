"""The SDK's current connection: :func:`init_sdk` sets it, everything else reads it.

Settings resolve argument > environment (``ANYLEARN_HOST``, ``ANYLEARN_TOKEN``,
``ANYLEARN_HOME``) > config file (``anylearn login``) > the embedded local backend, which is
started on 127.0.0.1 when nothing else is configured (see :mod:`anylearn_sdk.local_backend`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

from anylearn_sdk import local_backend
from anylearn_sdk.client.http import ApiClient, make_body
from anylearn_sdk.config import (
    Settings,
    anylearn_home,
    configured_host,
    env_token,
    normalize_host,
    save_login,
    stored_token,
)
from anylearn_sdk.errors import AnylearnError, ConfigurationError
from anylearn_sdk.store import LocalStore
from anylearn_sdk.wire import Health, LoginBody, LoginResult, UserRecord


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


def request_token(host: str, username: str, password: str) -> str:
    """Exchange a username and password for a new token at ``host``.

    Raises:
        AuthenticationError: wrong username or password.
    """
    body = make_body(LoginBody, username=username, password=password)
    return ApiClient(host, None).call("POST", "/auth/login", LoginResult, body).token


def login(
    host: str,
    username: str | None = None,
    password: str | None = None,
    *,
    token: str | None = None,
) -> UserRecord:
    """Log in to the backend at ``host`` and make it the default (as ``anylearn login``).

    The token (``token``, or a new one for ``username``/``password``) is checked, then saved
    for ``host`` in ``ANYLEARN_HOME/credentials.json`` (mode 0600); later calls use it.

    Returns:
        The user the token belongs to.

    Raises:
        ConfigurationError: a bad address, or neither a token nor a username and password.
        AuthenticationError: the password or the token was rejected.
    """
    host = normalize_host(host)
    if token is None:
        if username is None or password is None:
            raise ConfigurationError("give a token, or a username and a password")
        token = request_token(host, username, password)
    home = anylearn_home()
    ctx = connect(Settings(host=host, token=token, home=home, username=username))
    user = ctx.api.call("GET", "/users/me", UserRecord)
    save_login(home, host, token, user.username)
    reset()
    return user


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
        token = request_token(host, username, password)
    if token is None and not embedded:
        token = env_token(home, host)
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
    """Open a connection with resolved ``settings``: check the server answers and the token is
    good. A client of the embedded backend re-reads its address after a connection failure.

    Raises:
        ServerError: the backend cannot be reached.
        AuthenticationError: the token was rejected.
    """
    locate = None
    if settings.embedded:
        data_dir = local_backend.data_dir_for(settings.home)

        def locate() -> str | None:
            return local_backend.current_url(data_dir)

    api = ApiClient(settings.host, settings.token, locate=locate)
    health = api.call("GET", "/health", Health)
    api.request("GET", "/users/me")  # fail now, with a clear 401, if the token is wrong
    return SdkContext(settings=settings, api=api, server_id=health.server_id)


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
        api = ApiClient(host, None)
        return api.call("GET", "/health", Health, retry=False, timeout=(3.0, 5.0)).server_id
    except AnylearnError:
        return None
