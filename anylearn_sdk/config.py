"""Every setting and ``ANYLEARN_*`` variable, parsed here and nowhere else.

Resolution: argument > environment > config file > the embedded local backend. Variables
(all listed in ``docs/environment-variables.md``):

* ``ANYLEARN_HOME``: the local folder for config, credentials and the store (``~/.anylearn``).
* ``ANYLEARN_HOST``: the backend's base URL, for example ``http://10.0.0.5:8080``.
* ``ANYLEARN_TOKEN``: a bearer token for ``ANYLEARN_HOST`` (or, without it, for the host
  ``anylearn login`` saved). It is sent to that host only, never to another address given to
  ``init_sdk`` nor to the embedded backend.
* ``ANYLEARN_DISABLE_PROGRESS_BARS`` (boolean): hide tqdm bars.
* ``ANYLEARN_UPLOAD_STREAMS`` (positive integer): parallel upload streams.
* ``ANYLEARN_HASH_MMAP`` (boolean, default true): map large files to hash them.

Booleans follow one rule (:func:`env_flag`): ``1``, ``true``, ``yes``, ``on`` or ``0``,
``false``, ``no``, ``off``, any case; unset or empty is the default; anything else is an
error naming the value.

Files under ``ANYLEARN_HOME``: ``config.json`` (``{"host", "username"}``, written by
``anylearn login``) and ``credentials.json`` (``{host: {"token", "username"}}``, mode 0600).
Variables are read when a client or a call needs them, never at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from anylearn_sdk.errors import ConfigurationError
from anylearn_sdk.fileutil import write_private_json
from anylearn_sdk.wire import API_PREFIX

CONFIG_FILE = "config.json"
CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class Settings:
    """Resolved settings of one client.

    Attributes:
        host: the backend's base URL, without ``/api/v1``.
        token: the bearer token (never printed: excluded from ``repr``).
        home: the local anylearn folder.
        username: who the token belongs to, when known.
        embedded: True when ``host`` is the embedded local backend.
    """

    host: str
    token: str = field(repr=False)
    home: Path
    username: str | None = None
    embedded: bool = False


HOME_VAR = "ANYLEARN_HOME"
HOST_VAR = "ANYLEARN_HOST"
TOKEN_VAR = "ANYLEARN_TOKEN"  # noqa: S105 - a variable name, not a secret
PROGRESS_VAR = "ANYLEARN_DISABLE_PROGRESS_BARS"
STREAMS_VAR = "ANYLEARN_UPLOAD_STREAMS"
HASH_MMAP_VAR = "ANYLEARN_HASH_MMAP"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """The boolean variable ``name`` (see the module docstring for the rule).

    Raises:
        ConfigurationError: a value that is neither true nor false.
    """
    env = os.environ if env is None else env
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigurationError(
        f"{name}={env.get(name)!r}; use one of {', '.join(_TRUE)} or {', '.join(_FALSE)}"
    )


def env_positive_int(name: str, env: Mapping[str, str] | None = None) -> int | None:
    """The positive integer variable ``name``, or None when unset or empty.

    Raises:
        ConfigurationError: anything but a positive integer.
    """
    env = os.environ if env is None else env
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(f"{name}={raw!r}; use a positive integer")
    return int(raw)


def progress_bars_disabled() -> bool:
    return env_flag(PROGRESS_VAR, False)


def hash_mmap_enabled() -> bool:
    return env_flag(HASH_MMAP_VAR, True)


def anylearn_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(HOME_VAR) or Path.home() / ".anylearn").expanduser()


def normalize_host(host: str) -> str:
    """Check and normalize a backend URL: ``http(s)://host[:port][/prefix]``, no credentials.

    Raises:
        ConfigurationError: the URL has no http(s) scheme or host, or embeds a user or password.
    """
    host = host.strip().rstrip("/")
    host = host.removesuffix(API_PREFIX)
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"cluster address {host!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise ConfigurationError("cluster address must not embed credentials; use a token")
    return host


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ConfigurationError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} does not hold a JSON object")
    return data


def save_login(home: Path, host: str, token: str, username: str | None) -> None:
    """Remember ``host`` as the default backend and its token (credentials file mode 0600)."""
    credentials = read_json(home / CREDENTIALS_FILE)
    credentials[host] = {"token": token, "username": username}
    write_private_json(home / CREDENTIALS_FILE, credentials)
    config = read_json(home / CONFIG_FILE)
    config.update(host=host, username=username)
    write_private_json(home / CONFIG_FILE, config)


def stored_token(home: Path, host: str) -> tuple[str | None, str | None]:
    """(token, username) saved for ``host`` by ``anylearn login``, or (None, None)."""
    entry = read_json(home / CREDENTIALS_FILE).get(host) or {}
    return entry.get("token"), entry.get("username")


def configured_host(home: Path, env: Mapping[str, str] | None = None) -> str | None:
    """The backend chosen by environment or config file, or None for the embedded backend."""
    env = os.environ if env is None else env
    host = env.get(HOST_VAR) or read_json(home / CONFIG_FILE).get("host")
    return normalize_host(host) if host else None


def env_token(home: Path, host: str, env: Mapping[str, str] | None = None) -> str | None:
    """``ANYLEARN_TOKEN`` if it belongs to ``host``: the host of ``ANYLEARN_HOST`` when that is
    set, else the host ``anylearn login`` saved; None otherwise (the token goes nowhere else).
    """
    env = os.environ if env is None else env
    token = env.get(TOKEN_VAR, "").strip()
    if not token:
        return None
    owner = env.get(HOST_VAR) or read_json(home / CONFIG_FILE).get("host")
    return token if owner and normalize_host(owner) == host else None
