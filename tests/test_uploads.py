"""The data path against the real backend: per-file dedup, parallel parts, archives, expiry."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time
import zipfile

import pytest
import requests
from click.testing import CliRunner

from anylearn_sdk import preview_dataset, sync_dataset
from anylearn_sdk.cli.main import cli
from anylearn_sdk.client.tus import TUS_VERSION, TusClient, encode_metadata
from anylearn_sdk.content.manifest import build_manifest
from anylearn_sdk.errors import ResourceError
from anylearn_sdk.protocol import ManifestEntry, manifest_checksum
from anylearn_sdk.resources import dataset, upload
from anylearn_sdk.resources.upload import SliceBody
from anylearn_sdk.session import get_context, init_sdk
from tests.conftest import age, start_server

pytestmark = pytest.mark.integration


def make_folder(root, small=50, small_size=3000, large=()):
    root.mkdir(parents=True)
    for i in range(small):
        (root / f"s{i:03d}.bin").write_bytes(os.urandom(small_size))
    for i, size in enumerate(large):
        (root / f"large{i}.bin").write_bytes(os.urandom(size))
    age(root)
    return root


def register(ctx, folder):
    """Register ``folder`` by hand (its whole manifest); returns the manifest and the reply."""
    manifest = build_manifest(folder, None)
    entries = [e.to_json() for e in manifest.entries]
    reply = ctx.api.post_json(
        "/datasets", {"name": "d", "checksum": manifest.checksum, "manifest": entries}
    )
    return manifest, reply


class FixedBody:
    """A tus upload body held in memory."""

    def __init__(self, data: bytes):
        self.data, self.length = data, len(data)

    def read_at(self, offset, size):
        return self.data[offset : offset + size]


def wait_state(ctx, resource_id, *, not_in=("UPLOADING",), timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = ctx.api.get_json(f"/datasets/{resource_id}")
        if data["state"] not in not_in:
            return data
        time.sleep(0.05)
    raise AssertionError(f"{resource_id} still {data['state']}")


def test_one_changed_file_sends_only_that_file(user, tmp_path):
    data = make_folder(tmp_path / "data", small=300, small_size=20_000)
    first = sync_dataset(data, progress=False, resource_polling=0.1)
    assert first.state == "READY" and first.file_count == 300
    api = get_context().api
    (data / "s007.bin").write_bytes(os.urandom(20_000))
    before = api.sent_bytes
    second = sync_dataset(data, progress=False, resource_polling=0.1)
    sent = api.sent_bytes - before
    assert second.id != first.id and second.state == "READY"
    assert 20_000 <= second.uploaded_bytes <= 20_000 + 4096  # the file, in a one-member pack
    # Every request included: the version is registered as a delta of one entry, not 300.
    assert sent <= 20_000 + 16 * 1024
    again = sync_dataset(data, progress=False)
    assert again.id == second.id and again.uploaded_bytes == 0


def test_delta_falls_back_to_the_whole_manifest_when_the_base_is_gone(user, tmp_path):
    data = make_folder(tmp_path / "data", small=20)
    first = sync_dataset(data, progress=False, resource_polling=0.1)
    get_context().api.request("DELETE", f"/datasets/{first.id}")
    (data / "s001.bin").write_bytes(os.urandom(3000))
    second = sync_dataset(data, progress=False, resource_polling=0.1)
    assert second.state == "READY" and second.file_count == 20
    assert second.checksum == build_manifest(data, None).checksum


def test_unchanged_folder_deleted_on_the_server_is_sent_again(user, tmp_path):
    # The resubmit asks about the folder's last checksum while it walks; that answer must not
    # vouch for a version the server no longer has.
    data = make_folder(tmp_path / "data", small=20)
    first = sync_dataset(data, progress=False, resource_polling=0.1)
    assert sync_dataset(data, progress=False).id == first.id
    get_context().api.request("DELETE", f"/datasets/{first.id}")
    again = sync_dataset(data, progress=False, resource_polling=0.1)
    assert again.id != first.id and again.state == "READY"
    assert get_context().api.get_json(f"/datasets/{again.id}")["state"] == "READY"


def test_large_file_travels_in_parallel_parts(user, tmp_path, monkeypatch):
    monkeypatch.setattr(upload, "LARGE_FILE_BYTES", 256 * 1024)
    monkeypatch.setattr(upload, "PART_BYTES", 1024 * 1024)
    monkeypatch.setenv("ANYLEARN_UPLOAD_STREAMS", "8")  # a stream's share under PART_BYTES
    data = make_folder(tmp_path / "data", small=20, large=(3_500_000, 600_000))
    result = sync_dataset(data, progress=False, resource_polling=0.1)
    assert result.state == "READY"
    uploads = get_context().api.get_json("/uploads", params={"resource_id": result.id})
    kinds = sorted((u["concat"] or u["kind"]) for u in uploads)
    assert kinds == ["final", "object", "pack", "partial", "partial", "partial", "partial"]
    assert all(u["state"] == "STORED" for u in uploads)
    assert sum(u["length"] for u in uploads if u["concat"] != "final") == sum(
        u["received_bytes"] for u in uploads
    )


def test_tus_concatenation_by_hand(user, tmp_path):
    blob = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "blob.bin").write_bytes(blob)
    ctx = get_context()
    manifest, res = register(ctx, tmp_path / "d")
    tus = TusClient(ctx.api)
    source = manifest.sources[manifest.entries[0].sha256]
    cut = 1024 * 1024
    urls = []
    for start, end in ((0, cut), (cut, len(blob))):
        url = tus.create(end - start, {"resource_id": res["id"]}, partial=True)
        tus.upload(url, SliceBody(source, start, end - start))
        urls.append(url)
    meta = {"kind": "object", "sha256": hashlib.sha256(blob).hexdigest(), "resource_id": res["id"]}
    final = tus.concatenate(urls, meta)
    assert tus.concatenate(urls, meta) == final  # idempotent: a crashed client may ask again
    head = ctx.api.request("HEAD", final, headers={"Tus-Resumable": TUS_VERSION})
    assert head.headers["Upload-Concat"] == "final;" + " ".join(urls)
    assert head.headers["Upload-Length"] == str(len(blob))
    assert wait_state(ctx, res["id"])["state"] == "READY"


def test_final_of_incomplete_parts_is_refused(user, tmp_path):
    data = make_folder(tmp_path / "d", small=1, small_size=10)
    ctx = get_context()
    manifest, res = register(ctx, data)
    tus = TusClient(ctx.api)
    part = tus.create(10, {"resource_id": res["id"]}, partial=True)
    meta = encode_metadata({"kind": "pack", "resource_id": res["id"]})
    response = ctx.api.request(
        "POST", "/uploads", check=False,
        headers={"Tus-Resumable": TUS_VERSION, "Upload-Concat": f"final;{part}",
                 "Upload-Metadata": meta},
    )  # fmt: skip
    assert response.status_code == 400 and "not complete" in response.json()["error"]["message"]


def test_archive_syncs_without_extraction_and_dedups_with_its_folder(user, tmp_path):
    data = make_folder(tmp_path / "data", small=30)
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(data.iterdir()):
            zf.write(path, path.name)
    from_zip = sync_dataset(dataset_archive=zpath, progress=False, resource_polling=0.1)
    assert from_zip.state == "READY" and from_zip.file_count == 30
    from_folder = sync_dataset(data, progress=False)
    assert from_folder.id == from_zip.id and from_folder.uploaded_bytes == 0


def test_server_refuses_a_manifest_path_leaving_the_dataset(user):
    ctx = get_context()
    before = ctx.api.get_json("/datasets")
    entry = {"path": "../evil", "size": 1, "mode": 0o644, "sha256": "0" * 64}
    response = ctx.api.request(
        "POST", "/datasets", json={"name": "x", "checksum": "0" * 64, "manifest": [entry]},
        check=False,
    )  # fmt: skip
    assert response.status_code == 400 and "'..'" in response.json()["error"]["message"]
    setuid = {**entry, "path": "run.sh", "mode": 0o4755}
    response = ctx.api.request(
        "POST", "/datasets", json={"name": "x", "checksum": "0" * 64, "manifest": [setuid]},
        check=False,
    )  # fmt: skip
    assert response.status_code == 400 and "mode 4755" in response.json()["error"]["message"]
    assert ctx.api.get_json("/datasets") == before


def test_server_refuses_a_link_member_in_a_pack(user, tmp_path):
    data = make_folder(tmp_path / "d", small=1, small_size=10)
    ctx = get_context()
    manifest, res = register(ctx, data)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(manifest.entries[0].sha256)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    body = buffer.getvalue()

    tus = TusClient(ctx.api)
    url = tus.create(len(body), {"kind": "pack", "resource_id": res["id"]})
    tus.upload(url, FixedBody(body))
    final = wait_state(ctx, res["id"])
    assert final["state"] == "ERROR" and "not a regular object file" in final["error"]


def test_objects_of_another_user_must_be_uploaded_again(user, backend, tmp_path):
    data = make_folder(tmp_path / "data", small=5)
    sync_dataset(data, progress=False, resource_polling=0.1)
    name = f"other{os.getpid()}{time.monotonic_ns() % 10**6}"
    backend.admin("POST", "/users", json={"username": name, "password": "pw-123456"})
    token = requests.post(
        f"{backend.url}/api/v1/auth/login",
        json={"username": name, "password": "pw-123456"},
        timeout=30,
    ).json()["token"]
    init_sdk(backend.url, token=token)
    digests = sorted(e.sha256 for e in build_manifest(data, None).entries)
    # Whether someone else holds a file is not revealed: all five count as missing.
    assert get_context().api.post_json("/objects/missing", {"digests": digests})["missing"] == (
        digests
    )
    other = sync_dataset(data, progress=False, resource_polling=0.1)
    assert other.state == "READY" and other.uploaded_bytes > 0


def test_preview_counts_without_creating(user, tmp_path):
    data = make_folder(tmp_path / "data", small=12, small_size=1000, large=(50_000,))
    (data / ".anylearnignore").write_text("s00*.bin\n")
    age(data)
    ctx = get_context()
    before = ctx.api.get_json("/datasets")
    preview = preview_dataset(data)
    assert preview.file_count == 4  # s010, s011, large0, .anylearnignore
    assert preview.biggest[0] == ("large0.bin", 50_000)
    assert preview.known_id is None and preview.upload_files == 4
    assert preview.upload_bytes >= preview.total_bytes
    assert ctx.api.get_json("/datasets") == before
    sync_dataset(data, progress=False, resource_polling=0.1)
    result = CliRunner().invoke(cli, ["datasets", "preview", str(data), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["known_id"] and shown["upload_bytes"] == 0 and shown["hashed_bytes"] == 0
    result = CliRunner().invoke(cli, ["datasets", "preview", str(data)])
    assert "nothing to upload" in result.output and "large0.bin" in result.output


def test_stale_uploads_expire(tmp_path):
    """A server with a 1 s expiry answers 410 for a stale upload, then sweeps it."""
    data_dir = tmp_path / "server"
    proc, url = start_server(data_dir, "--upload-expiry", "1")
    try:
        token = json.loads((data_dir / "admin-credentials.json").read_text())["token"]
        init_sdk(url, token=token)
        folder = make_folder(tmp_path / "d", small=1, small_size=100)
        ctx = get_context()
        _, res = register(ctx, folder)
        tus = TusClient(ctx.api)
        upload_url = tus.create(100, {"kind": "pack", "resource_id": res["id"]})
        head = ctx.api.request("HEAD", upload_url, headers={"Tus-Resumable": TUS_VERSION})
        assert "GMT" in head.headers["Upload-Expires"]
        time.sleep(1.2)
        gone = ctx.api.request(
            "HEAD", upload_url, headers={"Tus-Resumable": TUS_VERSION}, check=False
        )
        assert gone.status_code == 410
        upload_file = data_dir / "uploads" / upload_url.rsplit("/", 1)[-1]
        deadline = time.monotonic() + 10
        while upload_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not upload_file.exists()
        swept = ctx.api.request(
            "HEAD", upload_url, headers={"Tus-Resumable": TUS_VERSION}, check=False
        )
        assert swept.status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_malformed_delta_is_a_clear_400(user, tmp_path):
    data = make_folder(tmp_path / "data", small=3)
    first = sync_dataset(data, progress=False, resource_polling=0.1)
    ctx = get_context()
    before = ctx.api.get_json("/datasets")
    response = ctx.api.request(
        "POST",
        "/datasets",
        json={
            "name": "x",
            "checksum": "0" * 64,
            "base_checksum": first.checksum,
            "changes": [{"path": "s000.bin"}],
        },
        check=False,
    )
    assert response.status_code == 400
    assert "needs path, size, mode and sha256" in response.json()["error"]["message"]
    assert ctx.api.get_json("/datasets") == before


def test_a_delta_is_spliced_or_applied_and_checked_against_its_base(user, tmp_path):
    """Deltas against a READY version: changes and removals (spliced into its canonical
    bytes) and additions (applied to its rows) give the manifest the checksum names, ask only
    for the changed objects, and a delta that does not fit its base is a 400 creating nothing."""
    data = make_folder(tmp_path / "data", small=5)
    base = sync_dataset(data, progress=False, resource_polling=0.1)
    ctx = get_context()
    entries = {e.path: e for e in build_manifest(data, None).entries}
    new = ManifestEntry("s001.bin", 4, 0o755, hashlib.sha256(b"new!").hexdigest())
    added = ManifestEntry("sub/added.bin", 3, 0o644, hashlib.sha256(b"add").hexdigest())

    def post(changes, removed, expect):
        body = {
            "name": "d",
            "checksum": manifest_checksum(expect),
            "base_checksum": base.checksum,
            "changes": [e.to_json() for e in changes],
            "removed": removed,
        }
        return ctx.api.request("POST", "/datasets", json=body, check=False)

    for changes, removed in (([new], ["s003.bin"]), ([new, added], ["s003.bin"])):
        expect = [e for p, e in entries.items() if p not in ("s001.bin", "s003.bin")] + changes
        reply = post(changes, removed, expect)
        assert reply.status_code == 201, reply.text
        version = reply.json()
        assert sorted(version["missing"]) == sorted(e.sha256 for e in changes)
        assert (version["file_count"], version["total_bytes"]) == (
            len(expect),
            sum(e.size for e in expect),
        )
        stored = ctx.api.get_json(f"/datasets/{version['id']}", params={"manifest": True})
        assert stored["manifest"] == [e.to_json() for e in sorted(expect)]
    before = ctx.api.get_json("/datasets")
    for changes, removed, message in (
        ([], ["nope.bin"], "removed path 'nope.bin' is not in the base manifest"),
        ([new], ["s001.bin"], "a path is both changed and removed"),
        ([ManifestEntry("s000.bin/x", 1, 0o644, new.sha256)], [], "is both a file and a folder"),
    ):
        reply = post(changes, removed, list(entries.values()))
        assert reply.status_code == 400 and message in reply.json()["error"]["message"]
    wrong = post([new], [], list(entries.values()))  # the checksum of another manifest
    assert wrong.status_code == 400 and "does not match" in wrong.json()["error"]["message"]
    assert ctx.api.get_json("/datasets") == before


def test_small_files_leave_as_preuploads_and_the_version_lacks_nothing(user, tmp_path, monkeypatch):
    monkeypatch.setattr(upload, "PACK_BYTES", 40_000)  # 50 files of 3,000 bytes: 4 packs
    data = make_folder(tmp_path / "data", small=50)
    (data / "s049.bin").write_bytes((data / "s000.bin").read_bytes())  # sent once
    age(data)
    ctx = get_context()
    result = sync_dataset(data, progress=False, resource_polling=0.1)
    assert result.state == "READY"
    preuploads = ctx.api.get_json("/uploads")
    assert len(preuploads) == 4
    assert {(u["kind"], u["state"]) for u in preuploads} == {("pack", "STORED")}
    assert ctx.api.get_json("/uploads", params={"resource_id": result.id}) == []
    assert result.uploaded_bytes == sum(u["length"] for u in preuploads)
    # 49 distinct files, each a 512-byte header and its data padded to 512 bytes.
    members = sum(u["length"] - 1024 for u in preuploads)  # less each end-of-archive marker
    assert members == 49 * (512 + 3072)
    manifest = build_manifest(data, None)
    for entry in manifest.entries:
        path = user.backend.data_dir / "objects" / entry.sha256[:2] / entry.sha256[2:]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256

    # The same files in a new folder: every pack is asked about first, and nothing travels.
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in data.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    age(copy)
    again = sync_dataset(copy, progress=False, resource_polling=0.1)
    assert (again.id, again.uploaded_bytes) == (result.id, 0)
    assert len(ctx.api.get_json("/uploads")) == 4


def test_a_preupload_that_fails_verification_fails_alone(user, tmp_path):
    """A pack of no version with a member whose bytes do not hash to its name: refused, no
    version touched, and a registration after it lists that object missing."""
    data = make_folder(tmp_path / "d", small=2, small_size=100)
    ctx = get_context()
    manifest = build_manifest(data, None)
    good, bad = manifest.entries
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry, content in ((good, (data / good.path).read_bytes()), (bad, b"x" * 100)):
            info = tarfile.TarInfo(entry.sha256)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    body = buffer.getvalue()

    tus = TusClient(ctx.api)
    tus.upload(tus.create(len(body), {"kind": "pack"}), FixedBody(body))
    _, res = register(ctx, data)  # the preupload was verified before its last PATCH answered
    [preupload] = ctx.api.get_json("/uploads")
    assert preupload["state"] == "FAILED" and "failed verification" in preupload["error"]
    assert res["state"] == "UPLOADING" and res["missing"] == sorted([good.sha256, bad.sha256])


def test_a_version_registered_before_its_preuploads_arrive_becomes_ready_as_they_do(
    user, tmp_path, monkeypatch
):
    """The version is registered while its packs still travel (held back here): it lists
    their objects missing, the client does not send them again, and each stored preupload
    strikes its objects off, so the version ends READY."""
    monkeypatch.setattr(upload, "PACK_BYTES", 40_000)
    data = make_folder(tmp_path / "data", small=50)
    registered = threading.Event()
    send = upload.UploadRun.send

    def after_registration(self, unit):
        assert registered.wait(30)
        return send(self, unit)

    register_version = dataset._register

    def register_first(*args, **kwargs):
        version = register_version(*args, **kwargs)
        assert len(version.missing) == 50  # nothing had arrived
        registered.set()
        return version

    monkeypatch.setattr(upload.UploadRun, "send", after_registration)
    monkeypatch.setattr(dataset, "_register", register_first)
    result = sync_dataset(data, progress=False, resource_polling=0.1)
    assert result.state == "READY" and registered.is_set()
    ctx = get_context()
    assert ctx.api.get_json("/uploads", params={"resource_id": result.id}) == []
    assert result.uploaded_bytes == sum(u["length"] for u in ctx.api.get_json("/uploads"))


def test_a_preupload_refused_after_registration_fails_the_sync(user, tmp_path, monkeypatch):
    """A pack the server refuses once the version lists its objects: the call ends with the
    reason rather than waiting for objects that will not come, and a rerun sends them."""
    monkeypatch.setattr(upload, "PACK_BYTES", 40_000)
    data = make_folder(tmp_path / "data", small=50)
    read_into = upload.PackReader.read_into

    def corrupt(self, offset, view):
        filled = read_into(self, offset, view)
        if offset == 0 and filled > 600:
            view[600] ^= 0xFF  # the first member's first bytes
        return filled

    monkeypatch.setattr(upload.PackReader, "read_into", corrupt)
    with pytest.raises(ResourceError, match="preupload .* failed: object .* failed verification"):
        sync_dataset(data, progress=False, resource_polling=0.1, resource_timeout=30)
    monkeypatch.setattr(upload.PackReader, "read_into", read_into)
    again = sync_dataset(data, progress=False, resource_polling=0.1)
    assert again.state == "READY"
