"""A tus 1.0 client: core, creation, termination and concatenation.

Protocol: https://tus.io/protocols/resumable-upload. Each PATCH sends at most
``UPLOAD_CHUNK_BYTES``. After a connection reset, a timeout, a 409 (offset conflict, tus
§Core "PATCH") or a 423 (another request still writing), the client asks ``HEAD`` for the
server's offset and continues from there, so bytes the server acknowledged are never sent
again. Waits back off exponentially with jitter (tenacity) and start over after each chunk the
server accepts.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from anylearn_sdk.client.http import ApiClient, raise_for_status
from anylearn_sdk.errors import AnylearnError, HTTPError, ServerError
from anylearn_sdk.wire import TUS_VERSION

UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
#: Most bytes one PATCH request carries (streamed in ``UPLOAD_CHUNK_BYTES`` reads).
PATCH_BYTES = 128 * 1024 * 1024
#: Attempts at one chunk before giving up; the count starts over after every accepted chunk.
CHUNK_ATTEMPTS = 8
#: (connect, read) seconds for one PATCH.
PATCH_TIMEOUT = (10.0, 300.0)
_RETRY_STATUSES = frozenset({409, 423, 408, 429, 500, 502, 503, 504})


class Body(Protocol):
    """What an upload sends: ``length`` bytes, any range of which can be read again."""

    length: int

    def read_at(self, offset: int, size: int) -> bytes: ...


class FillableBody(Body, Protocol):
    """A body that can also fill a caller's buffer (no bytes object per read)."""

    def read_into(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset``; returns the bytes filled (fewer only at the end)."""


class UploadStopped(AnylearnError):
    """The upload was stopped on request (Ctrl-C): what the server acknowledged stays, and
    the next run resumes from the server's offset."""


class _PatchBody:
    """Bytes ``start``..``end`` of a body, streamed ``UPLOAD_CHUNK_BYTES`` at a time.

    Having a length, it goes out with ``Content-Length`` and each block is handed to the socket
    as is (chunked encoding would copy every block once more to frame it). One PATCH thus
    carries up to ``PATCH_BYTES`` with one round trip, and a cut connection still keeps every
    byte that reached the server.

    A body with ``read_into`` (:class:`FillableBody`) is read into one buffer, reused for each
    block: http.client hands a block to ``sendall`` before it asks for the next, so no block
    is overwritten while still needed, and no fresh memory is faulted in for every 8 MiB.
    """

    def __init__(
        self,
        reader: Body,
        start: int,
        end: int,
        count: Callable[[int], None],
        stop: threading.Event | None = None,
    ):
        self.reader, self.start, self.end, self.count = reader, start, end, count
        self.stop = stop

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        offset = self.start
        fill = getattr(self.reader, "read_into", None)
        buffer = memoryview(bytearray(min(UPLOAD_CHUNK_BYTES, len(self)))) if fill else None
        while offset < self.end:
            if self.stop is not None and self.stop.is_set():
                # Raised inside the request: urllib3 closes the connection, and the server
                # keeps the bytes that reached it (tus §Core, PATCH without a checksum).
                raise UploadStopped("upload stopped")
            want = min(UPLOAD_CHUNK_BYTES, self.end - offset)
            if buffer is not None:
                block = buffer[: fill(offset, buffer[:want])]
            else:
                block = self.reader.read_at(offset, want)
            if not block:
                return
            self.count(len(block))
            offset += len(block)
            yield block


class _Resync(Exception):
    """The server's offset must be asked again before the next PATCH."""


def encode_metadata(metadata: Mapping[str, str]) -> str:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (tus §Creation)."""
    return ",".join(
        f"{k} {base64.b64encode(v.encode('utf-8')).decode('ascii')}" for k, v in metadata.items()
    )


class TusClient:
    """A tus client of one backend's upload endpoint.

    Args:
        api: the backend's client (session, token, retries).
        endpoint: the upload creation URL path.
        stop: when set, a PATCH in flight ends within one ``UPLOAD_CHUNK_BYTES`` read and the
            upload raises :class:`UploadStopped`; backoff waits end at once too.
    """

    def __init__(
        self, api: ApiClient, endpoint: str = "/uploads", *, stop: threading.Event | None = None
    ):
        self.api = api
        self.endpoint = endpoint
        self.stop = stop

    def create(self, length: int, metadata: Mapping[str, str], *, partial: bool = False) -> str:
        """Create an upload of ``length`` bytes (a partial one for concatenation if asked).

        Returns:
            The upload's URL path.
        """
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Length": str(length),
            "Upload-Metadata": encode_metadata(metadata),
        }
        if partial:
            headers["Upload-Concat"] = "partial"
        response = self.api.request("POST", self.endpoint, headers=headers)
        return response.headers["Location"]

    def concatenate(self, urls: Sequence[str], metadata: Mapping[str, str]) -> str:
        """Create the final upload joining complete partial uploads, in order (tus §Concatenation).

        Returns:
            The final upload's URL path.
        """
        response = self.api.request(
            "POST",
            self.endpoint,
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Upload-Concat": "final;" + " ".join(urls),
                "Upload-Metadata": encode_metadata(metadata),
            },
        )
        return response.headers["Location"]

    def offset(self, url: str) -> int | None:
        """The server's ``Upload-Offset``, or None if the upload no longer exists (404, 410)."""
        response = self.api.request(
            "HEAD", url, headers={"Tus-Resumable": TUS_VERSION}, check=False
        )
        if response.status_code in (404, 410):
            return None
        raise_for_status(response)
        return int(response.headers["Upload-Offset"])

    def terminate(self, url: str) -> None:
        self.api.request("DELETE", url, headers={"Tus-Resumable": TUS_VERSION}, check=False)

    def upload(
        self,
        url: str,
        reader: Body,
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        """Send ``reader``'s bytes from the server's current offset to the end.

        Args:
            url: the upload's URL from :meth:`create`.
            reader: the bytes (a pack, a file, a part of a file).
            on_bytes: called with the number of bytes the server accepted after each chunk,
                and once up front with the offset the server already had.

        Returns:
            Bytes the server stored during this call (not counting what it held before).

        Raises:
            ServerError: a chunk failed ``CHUNK_ATTEMPTS`` times in a row.
            HTTPError: the server refused the upload (401, 404, 460...).
            UploadStopped: ``stop`` was set.
        """
        offset = self.offset(url)
        if offset is None:
            raise HTTPError(f"upload {url} no longer exists on the server")
        return self.upload_from(url, offset, reader, on_bytes)

    def upload_from(
        self,
        url: str,
        offset: int,
        reader: Body,
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        """:meth:`upload` when the server's offset was just read (saves one HEAD)."""
        if on_bytes is not None and offset:
            on_bytes(offset)
        initial = offset
        state = {"offset": offset, "resync": False}

        def send_one_chunk() -> int:
            if state["resync"]:
                fresh = self.offset(url)
                if fresh is None:
                    raise HTTPError(f"upload {url} no longer exists on the server")
                if on_bytes is not None and fresh != state["offset"]:
                    on_bytes(fresh - state["offset"])
                state["offset"], state["resync"] = fresh, False
            start = state["offset"]
            end = min(reader.length, start + PATCH_BYTES)

            body = _PatchBody(reader, start, end, self.api.count_sent, self.stop)
            try:
                response = self.api.request(
                    "PATCH",
                    url,
                    data=body,
                    headers={
                        "Tus-Resumable": TUS_VERSION,
                        "Upload-Offset": str(start),
                        "Content-Type": "application/offset+octet-stream",
                    },
                    timeout=PATCH_TIMEOUT,
                    retry=False,
                    check=False,
                )
            except ServerError as err:
                state["resync"] = True
                raise _Resync(str(err)) from err
            if response.status_code in _RETRY_STATUSES:
                state["resync"] = True
                raise _Resync(f"HTTP {response.status_code}")
            raise_for_status(response)
            new_offset = int(response.headers["Upload-Offset"])
            state["offset"] = new_offset
            return new_offset - start

        stop = self.stop or threading.Event()
        while state["offset"] < reader.length:
            if stop.is_set():
                raise UploadStopped("upload stopped")
            retrying = Retrying(
                stop=stop_after_attempt(CHUNK_ATTEMPTS),
                wait=wait_exponential_jitter(multiplier=0.2, max=10.0, jitter=0.2),
                sleep=stop.wait,  # a backoff ends as soon as the upload is stopped
                retry=retry_if_exception(
                    lambda e: isinstance(e, (_Resync, requests.RequestException))
                ),
                reraise=True,
            )
            try:
                accepted = retrying(send_one_chunk)
            except _Resync as err:
                raise ServerError(f"upload {url} kept failing: {err}") from err
            if on_bytes is not None:
                on_bytes(accepted)
        return reader.length - initial
