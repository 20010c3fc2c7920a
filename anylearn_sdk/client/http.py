"""The one place the SDK talks HTTP: a shared session, finite timeouts, retries, error mapping.

Retries (tenacity) use exponential backoff with jitter, honour ``Retry-After``, and apply only
to requests that are safe to repeat: GET, HEAD, OPTIONS, PUT, DELETE, and any request that
carries an ``Idempotency-Key`` header. They cover connection errors and 408/429/5xx answers.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from anylearn_sdk._version import __version__
from anylearn_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    HTTPError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ServerError,
)
from anylearn_sdk.wire import API_PREFIX, IDEMPOTENCY_HEADER

log = logging.getLogger(__name__)
B = TypeVar("B", bound=BaseModel)
#: (connect, read) timeout in seconds for every call unless a call says otherwise.
DEFAULT_TIMEOUT = (10.0, 60.0)
RETRY_ATTEMPTS = 5
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_STATUS_CLASSES: dict[int, type[HTTPError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
}


def make_body(model: type[B], **fields: Any) -> B:
    """``model(**fields)``, a request body built from a caller's arguments.

    Raises:
        InvalidArgumentError: a field breaks the model's rules (one line naming it).
    """
    try:
        return model(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or model.__name__
        value = first.get("input")
        raise InvalidArgumentError(f"{where} {value!r}: {first.get('msg', 'invalid')}") from None


@functools.cache
def _adapter(into: Any) -> TypeAdapter:
    return TypeAdapter(into)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class _RetryableStatus(Exception):
    def __init__(self, response: requests.Response):
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def raise_for_status(response: requests.Response, *, resource_id: Any = None) -> None:
    """Raise the :mod:`anylearn_sdk.errors` class that matches an error response.

    The message is the server's one-line ``error.message`` when the body is the API's JSON
    error, else the status line. ``resource_id`` is attached to :class:`NotFoundError`.
    """
    if response.status_code < 400:
        return
    code = server_message = None
    try:
        error = response.json().get("error") or {}
        code, server_message = error.get("code"), error.get("message")
    except (ValueError, AttributeError):
        pass
    message = server_message or f"HTTP {response.status_code} {response.reason}"
    cls = _STATUS_CLASSES.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else HTTPError
    kwargs: dict[str, Any] = {"response": response, "code": code, "server_message": server_message}
    if cls is NotFoundError:
        kwargs["resource_id"] = resource_id
    raise cls(message, **kwargs)


def _retry_after_seconds(response: requests.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class _Wait:
    """Exponential backoff with jitter, unless the server asked for a ``Retry-After``."""

    def __init__(self) -> None:
        self._backoff = wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = _retry_after_seconds(getattr(exc, "response", None))
        return min(asked, 60.0) if asked is not None else self._backoff(state)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_RetryableStatus, requests.ConnectionError, requests.Timeout))


class ApiClient:
    """A bearer-token client of one backend's ``/api/v1``.

    The ``requests.Session`` is created on first use and dropped in a forked child (a pool's
    sockets must not be shared across processes).

    Args:
        host: the backend's base URL.
        token: the bearer token, sent in the ``Authorization`` header to ``host`` only.
        locate: for a backend whose address may change (the local one), a function giving its
            current base URL (None when it is down); asked after every connection failure, so
            the next attempt goes where the backend listens now.

    Attributes:
        sent_bytes: request body bytes sent so far, from every thread, retries included (what a
            submit really cost the network, manifests and uploads alike).
    """

    def __init__(
        self, host: str, token: str | None, *, locate: Callable[[], str | None] | None = None
    ):
        self.host = host.rstrip("/")
        self._token = token
        self._locate = locate
        self._local = threading.local()
        self._pid = os.getpid()
        self.sent_bytes = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ApiClient(host={self.host!r})"

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None or self._pid != os.getpid():
            self._pid = os.getpid()
            session = requests.Session()
            session.headers["User-Agent"] = f"anylearn-sdk/{__version__}"
            if self._token:
                session.headers["Authorization"] = f"Bearer {self._token}"
            self._local.session = session
        return session

    def url(self, path: str) -> str:
        """The full URL of ``path`` under ``/api/v1``, or ``path`` itself if it is a full URL
        on this backend.

        Raises:
            ServerError: ``path`` is a full URL on another origin (a ``Location`` header never
                takes the token elsewhere).
        """
        if path.startswith(("http://", "https://")):
            if _origin(path) != _origin(self.host):
                raise ServerError(f"the server pointed to {_origin(path)}, not {self.host}")
            return path
        if path.startswith(API_PREFIX):
            return f"{self.host}{path}"
        return f"{self.host}{API_PREFIX}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        resource_id: Any = None,
        retry: bool | None = None,
        check: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """Send one request with retries where safe; raise an :class:`HTTPError` on failure.

        Args:
            method: HTTP method.
            path: path under ``/api/v1`` (or a full URL from a ``Location`` header).
            timeout: seconds, or (connect, read) seconds.
            resource_id: named in a :class:`NotFoundError`.
            retry: force retries on or off; by default only safe or idempotent requests retry.
            check: raise on error statuses (False returns the response as is).
            **kwargs: passed to ``requests.Session.request`` (json, params, headers, data...).

        Raises:
            ServerError: the server could not be reached, or kept answering 5xx.
            HTTPError: a subclass matching the error status.
        """
        method = method.upper()
        headers: Mapping[str, str] = kwargs.get("headers") or {}
        if retry is None:
            retry = method in SAFE_METHODS or IDEMPOTENCY_HEADER in headers

        def attempt() -> requests.Response:
            url = self.url(path)
            try:
                response = self.session.request(method, url, timeout=timeout, **kwargs)
            except requests.RequestException as err:
                self._count(getattr(err, "request", None))
                if isinstance(err, requests.ConnectionError):
                    self.relocate()
                raise
            self._count(response.request)
            if retry and response.status_code in RETRY_STATUSES:
                raise _RetryableStatus(response)
            return response

        try:
            if retry:
                retrying = Retrying(
                    stop=stop_after_attempt(RETRY_ATTEMPTS),
                    wait=_Wait(),
                    retry=retry_if_exception(_is_retryable),
                    reraise=True,
                )
                response = retrying(attempt)
            else:
                response = attempt()
        except _RetryableStatus as err:
            response = err.response
        except (requests.ConnectionError, requests.Timeout) as err:
            raise ServerError(f"cannot reach {self.host}: {type(err).__name__}") from err
        if check:
            raise_for_status(response, resource_id=resource_id)
        return response

    def relocate(self) -> None:
        """Ask ``locate`` where the backend listens now, and go there from the next request."""
        if self._locate is None:
            return
        found = self._locate()
        if found:
            self.host = found.rstrip("/")

    def _count(self, prepared: requests.PreparedRequest | None) -> None:
        body = getattr(prepared, "body", None)
        if isinstance(body, (bytes, str)):
            self.count_sent(len(body))

    def count_sent(self, amount: int) -> None:
        """Add ``amount`` to :attr:`sent_bytes` (for streamed bodies, counted as they go)."""
        with self._count_lock:
            self.sent_bytes += amount

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post_json(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs).json()

    def call(
        self,
        method: str,
        path: str,
        into: Any,
        body: BaseModel | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send ``body`` (a :mod:`anylearn_sdk.wire` model; fields never set are left out, so
        the server applies the same defaults) and parse the answer into ``into`` (a model
        class, or a type such as ``list[TaskSummary]``).

        Raises:
            HTTPError: as :meth:`request`.
            ServerError: the answer does not match ``into`` (a server of another version).
        """
        if body is not None:
            kwargs["json"] = body.model_dump(mode="json", exclude_unset=True)
        response = self.request(method, path, **kwargs)
        try:
            return _adapter(into).validate_json(response.content)
        except ValidationError as err:
            raise ServerError(
                f"unexpected answer to {method} {path}: {err.errors()[0].get('msg', err)}"
            ) from err
