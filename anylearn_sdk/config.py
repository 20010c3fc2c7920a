"""Settings resolution: argument > environment > config file > the embedded local backend.

Environment variables (all listed in ``docs/environment-variables.md``):

* ``ANYLEARN_HOME``: the local folder for config, credentials and the store (``~/.anylearn``).
* ``ANYLEARN_HOST``: the backend's base URL, for example ``http://10.0.0.5:8080``.
* ``ANYLEARN_TOKEN``: a bearer token for that backend.
* ``ANYLEARN_DISABLE_PROGRESS_BARS``: any non-empty value other than ``0`` hides progress bars.

Files under ``ANYLEARN_HOME``: ``config.json`` (``{"host", "username"}``, written by
``anylearn login``) and ``credentials.json`` (``{host: {"token", "username"}}``, mode 0600).
Settings are resolved once, when a client is built, never at import time.
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


def anylearn_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("ANYLEARN_HOME") or Path.home() / ".anylearn").expanduser()


def normalize_host(host: str) -> str:
    """Check and normalize a backend URL: ``http(s)://host[:port][/prefix]``, no credentials.

    Raises:
        ConfigurationError: the URL has no http(s) scheme or host, or embeds a user or password.
    """
    host = host.strip().rstrip("/")
    if host.endswith("/api/v1"):
        host = host[: -len("/api/v1")]
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
    host = env.get("ANYLEARN_HOST") or read_json(home / CONFIG_FILE).get("host")
    return normalize_host(host) if host else None
