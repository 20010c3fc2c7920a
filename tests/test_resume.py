"""Uploads survive SIGKILL of the client at random points and connections dropped mid-part."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, admin_token, age, start_server

from anylearn_sdk import sync_dataset
from anylearn_sdk.content.manifest import build_manifest
from anylearn_sdk.session import get_context, init_sdk

pytestmark = pytest.mark.integration
CHILD_CHUNK = 128 * 1024  # tus.PATCH_BYTES in the child: one PATCH per stream may be cut
STREAMS = 4


def make_dataset(root: Path) -> Path:
    root.mkdir()
    for i in range(3):
        (root / f"large{i}.bin").write_bytes(os.urandom(6 * 1024 * 1024))  # 2 parts each
    (root / "medium.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # one object upload
    for i in range(200):
        (root / f"small{i:03d}.bin").write_bytes(os.urandom(20_000))  # 2 packs
    age(root)
    return root


def start_child(url: str, token: str, folder: Path) -> subprocess.Popen:
    """``sync_child.py`` syncing ``folder`` to ``url``, its progress lines on ``stdout``."""
    env = {**os.environ, "ANYLEARN_HOST": url, "ANYLEARN_TOKEN": token}
    return subprocess.Popen(
        [sys.executable, str(FIXTURES / "sync_child.py"), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_child(user, folder: Path, kill_after_events: int | None, delay: float = 0.0) -> bool:
    """Run the child; SIGKILL it ``delay`` seconds after its n-th progress line (if n is
    given; 0 means as soon as the upload phase starts). Returns True if it was killed."""
    proc = start_child(user.backend.url, user.token, folder)
    assert proc.stdout is not None
    events = 0
    for line in proc.stdout:
        events += line.startswith("sent")
        due = line.startswith("phase uploading") if kill_after_events == 0 else events
        if kill_after_events is not None and due and events >= kill_after_events:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    code = proc.wait(timeout=120)
    assert code in (0, -signal.SIGKILL), f"child exited {code}"
    return code == -signal.SIGKILL


def test_sigkill_at_random_points_never_corrupts_and_resends_little(user, tmp_path):
    folder = make_dataset(tmp_path / "data")
    rnd = random.Random(int(os.environ.get("ANYLEARN_TEST_SEED", "20261121")))
    kills = 0
    for i in range(20):
        # Every fourth run dies as its upload phase starts (journal being written); the others
        # after a random number of acknowledged chunks, plus up to 20 ms (mid-chunk).
        events = 0 if i % 4 == 0 else rnd.randint(1, 10)
        kills += run_child(user, folder, events, rnd.uniform(0, 0.02))
    assert kills == 20, "every run should have been killed before finishing"
    assert run_child(user, folder, None) is False  # the last run finishes

    ctx = get_context()
    manifest = build_manifest(folder, None)
    found = ctx.api.get_json("/datasets", params={"checksum": manifest.checksum})
    assert [d["state"] for d in found] == ["READY"]
    # Every object is on the server and its bytes hash to its name.
    for entry in manifest.entries:
        path = user.backend.data_dir / "objects" / entry.sha256[:2] / entry.sha256[2:]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    # Bytes that reached the server more than once: at most one chunk per stream per kill,
    # counting the packs sent before the version existed (preuploads).
    uploads = ctx.api.get_json("/uploads", params={"resource_id": found[0]["id"]})
    uploads += ctx.api.get_json("/uploads")
    received = sum(u["received_bytes"] for u in uploads)
    needed = sum(
        u["length"] for u in uploads if u["concat"] != "final" and u["state"] != "RECEIVING"
    )
    assert received - needed <= kills * STREAMS * CHILD_CHUNK, (received, needed, kills)


class DroppingProxy:
    """A TCP proxy that resets the connection carrying the upload every ``every`` bytes."""

    def __init__(self, target: tuple[str, int], every: int):
        self.target, self.every = target, every
        self.forwarded = 0
        self.drops = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _reset(self, *socks: socket.socket) -> None:
        # shutdown() acts at once even while the other pump thread is blocked in recv() on the
        # same socket (close() alone would wait for that recv to return).
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(256 * 1024):
                if upload:
                    with self.lock:
                        before = self.forwarded
                        self.forwarded += len(data)
                        crossed = before // self.every != self.forwarded // self.every
                        if crossed:
                            self.drops += 1
                    if crossed:
                        self._reset(src, dst)
                        return
                dst.sendall(data)
        except OSError:
            pass
        self._reset(src, dst)

    def close(self) -> None:
        self.server.close()


def test_upload_survives_a_connection_reset_every_50_mb(user, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(150 * 1024 * 1024))
    for i in range(100):
        (folder / f"s{i}.bin").write_bytes(os.urandom(30_000))
    age(folder)
    host, port = user.backend.url.removeprefix("http://").rsplit(":", 1)
    proxy = DroppingProxy((host, int(port)), 50 * 1000 * 1000)
    try:
        init_sdk(f"http://127.0.0.1:{proxy.port}", token=user.token)
        result = sync_dataset(folder, progress=False, resource_polling=0.1)
    finally:
        proxy.close()
    assert result.state == "READY"
    assert result.checksum == build_manifest(folder, None).checksum
    assert proxy.drops >= 3


#: Runs quick_train and dies (as a killed process would) when the upload begins.
DYING_CALL = """
import os, sys
from anylearn_sdk import quick_train

class DieAtUpload:
    def phase_start(self, phase, total, unit="B"):
        if phase.startswith("uploading"):
            os._exit(9)
    def advance(self, phase, amount): pass
    def phase_end(self, phase): pass
    def message(self, text): pass

quick_train(algorithm_dir=sys.argv[1], dataset_dir=sys.argv[2], entrypoint="python train.py",
            hyperparams={"note": "resumed"}, resource_polling=0.2, progress=DieAtUpload())
"""


def _dying_call(algorithm_repo: Path, data: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DYING_CALL, str(algorithm_repo), str(data)], timeout=120
    )
    assert done.returncode == 9


def _new_data(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "b.bin").write_bytes(os.urandom(300_000))
    age(root)
    return root


def test_a_call_that_died_before_its_task_existed_is_finished_by_resume(
    user, tmp_path, algorithm_repo, caplog
):
    from anylearn_sdk import (
        TaskState,
        list_train_tasks,
        quick_train,
        resume_unfinished_local_train_tasks,
    )

    store = get_context().store
    _dying_call(algorithm_repo, _new_data(tmp_path / "d1"))
    assert len(store.pending_calls()) == 1 and list_train_tasks() == []
    (task,) = resume_unfinished_local_train_tasks()
    assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED, task.logs()[0]
    assert "note resumed" in task.logs()[0] and task.refresh().inputs[0].file_count == 2
    assert [t.id for t in list_train_tasks()] == [task.id]
    assert store.pending_calls() == [] and resume_unfinished_local_train_tasks() == []

    # The same call made again by hand supersedes the dead one: resume makes no second task.
    again = _new_data(tmp_path / "d0")
    _dying_call(algorithm_repo, again)
    rerun = quick_train(
        algorithm_dir=algorithm_repo, dataset_dir=again, entrypoint="python train.py",
        hyperparams={"note": "resumed"}, resource_polling=0.2, progress=False,
    )[0]  # fmt: skip
    assert store.pending_calls() == []
    assert rerun.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    assert resume_unfinished_local_train_tasks() == [] and len(list_train_tasks()) == 2

    # Inputs changed since: refused, naming the folder and both checksums; forgotten.
    data = _new_data(tmp_path / "d2")
    _dying_call(algorithm_repo, data)
    (data / "a.txt").write_text("changed\n")
    with caplog.at_level("WARNING", logger="anylearn_sdk"):
        assert resume_unfinished_local_train_tasks() == []
    assert f"dataset_dir '{data}' now has checksum" in caplog.text, caplog.text
    assert store.pending_calls() == [] and len(list_train_tasks()) == 2

    # Code changed since: refused, naming the old and the new commit.
    _dying_call(algorithm_repo, _new_data(tmp_path / "d3"))
    before = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=algorithm_repo, capture_output=True, text=True
    ).stdout.strip()
    (algorithm_repo / "train.py").write_text((algorithm_repo / "train.py").read_text() + "\n#\n")
    subprocess.run(["git", "commit", "-qam", "changed"], cwd=algorithm_repo, check=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="anylearn_sdk"):
        assert resume_unfinished_local_train_tasks() == []
    assert f"algorithm_dir '{algorithm_repo}' is now commit" in caplog.text
    assert f"not {before[:12]}" in caplog.text and store.pending_calls() == []
    assert len(list_train_tasks()) == 2


def test_server_killed_mid_pack_resumes_to_ready_with_every_object_verified(tmp_path):
    """SIGKILL the backend while a pack's members are being stored from its arriving bytes;
    after a restart on the same data folder the rerun ends READY, every object hashes to its
    name, no temporary file is left, and only the bytes the server never wrote travel again."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(300):
        (folder / f"small{i:03d}.bin").write_bytes(os.urandom(20_000))  # 3 packs of 2 MiB
    age(folder)
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir)
    token = admin_token(data_dir)
    child = start_child(url, token, folder)
    assert child.stdout is not None
    sent = 0
    for line in child.stdout:
        sent += line.startswith("sent")
        if sent == 6:  # 384 KiB acknowledged: the first PATCHes of the packs are in
            break
    server.kill()  # SIGKILL, mid-pack
    server.wait(timeout=30)
    child.kill()
    child.stdout.close()
    child.wait(timeout=30)
    objects = data_dir / "objects"
    stored_before = [p for p in objects.glob("??/*") if not p.name.startswith(".")]
    assert 0 < len(stored_before) < 300, "the kill should land while packs are being stored"

    server, url = start_server(data_dir)
    try:
        init_sdk(url, token=token)
        result = sync_dataset(folder, progress=False, resource_polling=0.05)
        assert result.state == "READY"
        manifest = build_manifest(folder, None)
        for entry in manifest.entries:
            path = objects / entry.sha256[:2] / entry.sha256[2:]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
        assert list(objects.glob("??/.*")) == []  # the half member was swept at start
        # What reached the disk before the kill was kept: the rerun sent the rest.
        assert result.uploaded_bytes < sum(e.size for e in manifest.entries) + 300 * 1024
    finally:
        server.terminate()
        server.wait(timeout=30)
