"""tus 1.0 uploads against the real backend: resume after a cut, offset conflicts, verification."""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from anylearn_sdk.client.tus import TUS_VERSION, TusClient
from anylearn_sdk.content.manifest import build_manifest
from anylearn_sdk.content.pack import PackMember, PackReader
from anylearn_sdk.session import get_context

pytestmark = pytest.mark.integration


def register(tmp_path, size=3 * 1024 * 1024):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(os.urandom(size))
    ctx = get_context()
    manifest = build_manifest(folder, ctx.store)
    data = ctx.api.post_json(
        "/datasets",
        {
            "name": "big",
            "checksum": manifest.checksum,
            "manifest": [e.to_json() for e in manifest.entries],
        },
    )
    sizes = {e.sha256: e.size for e in manifest.entries}
    reader = PackReader([PackMember(d, sizes[d], manifest.sources[d]) for d in data["missing"]])
    return ctx, data, reader


class CountingReader:
    """Wraps a PackReader and counts the bytes handed to the client for sending."""

    def __init__(self, reader):
        self.reader, self.length, self.read = reader, reader.length, 0

    def read_at(self, offset, size):
        data = self.reader.read_at(offset, size)
        self.read += len(data)
        return data


def cut_patch(base_url: str, path: str, token: str, body: bytes, claimed_length: int) -> None:
    """Send a PATCH announcing ``claimed_length`` bytes, send only ``body``, then hang up."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = (
            f"PATCH {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
            f"Tus-Resumable: {TUS_VERSION}\r\nUpload-Offset: 0\r\n"
            "Content-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {claimed_length}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        time.sleep(0.3)


def test_upload_cut_mid_body_resumes_from_server_offset(user, tmp_path):
    ctx, data, reader = register(tmp_path)
    tus = TusClient(ctx.api)
    url = tus.create(reader.length, {"kind": "pack", "resource_id": data["id"]})
    sent_before_cut = 1024 * 1024 + 100
    cut_patch(user.backend.url, url, user.token, reader.read_at(0, sent_before_cut), reader.length)
    deadline = time.monotonic() + 10
    while tus.offset(url) != sent_before_cut and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tus.offset(url) == sent_before_cut  # every byte that arrived was kept

    counting = CountingReader(reader)
    stored = tus.upload(url, counting)
    assert stored == reader.length - sent_before_cut
    assert counting.read == reader.length - sent_before_cut  # acknowledged bytes never re-sent
    deadline = time.monotonic() + 10
    while (
        ctx.api.get_json(f"/datasets/{data['id']}")["state"] != "READY"
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert ctx.api.get_json(f"/datasets/{data['id']}")["state"] == "READY"


def test_offset_conflict_answers_409(user, tmp_path):
    ctx, data, reader = register(tmp_path, size=10_000)
    url = TusClient(ctx.api).create(reader.length, {"kind": "pack", "resource_id": data["id"]})
    response = requests.patch(
        f"{user.backend.url}{url}",
        data=b"x" * 10,
        headers={
            "Authorization": f"Bearer {user.token}",
            "Tus-Resumable": TUS_VERSION,
            "Upload-Offset": "5",
            "Content-Type": "application/offset+octet-stream",
        },
        timeout=30,
    )
    assert response.status_code == 409
    assert response.headers["Tus-Resumable"] == TUS_VERSION


def test_corrupt_pack_makes_version_error(user, tmp_path):
    ctx, data, reader = register(tmp_path, size=10_000)
    tus = TusClient(ctx.api)
    url = tus.create(reader.length, {"kind": "pack", "resource_id": data["id"]})
    good = reader.read_at(0, reader.length)
    corrupt = good[:600] + bytes([good[600] ^ 0xFF]) + good[601:]  # a byte of the member's data

    class Fixed:
        length = len(corrupt)

        def read_at(self, offset, size):
            return corrupt[offset : offset + size]

    tus.upload(url, Fixed())
    deadline = time.monotonic() + 10
    while (
        ctx.api.get_json(f"/datasets/{data['id']}")["state"] == "UPLOADING"
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    final = ctx.api.get_json(f"/datasets/{data['id']}")
    assert final["state"] == "ERROR" and "failed verification" in final["error"]


def test_options_advertises_the_protocol(backend):
    response = requests.options(f"{backend.url}/api/v1/uploads", timeout=30)
    assert response.headers["Tus-Version"] == TUS_VERSION
    assert "creation" in response.headers["Tus-Extension"]
    assert response.headers["Tus-Checksum-Algorithm"].split(",") == ["sha1", "sha256"]
