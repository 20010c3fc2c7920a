"""Ctrl-C during an upload: threads stop within a second, one line, one KeyboardInterrupt,
and the rerun takes the same dataset over and sends only what the server lacks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anylearn_sdk.client.tus import UPLOAD_CHUNK_BYTES
from anylearn_sdk.interrupts import INTERRUPTED_MESSAGE
from anylearn_sdk.resources.upload import default_streams
from tests.conftest import FIXTURES, age

pytestmark = pytest.mark.integration
MIB = 1024 * 1024
FILE_BYTES = 100 * MIB


def big_dataset(root: Path, files: int = 3) -> Path:
    root.mkdir()
    for i in range(files):
        with open(root / f"part-{i}.bin", "wb") as f:
            for _ in range(FILE_BYTES // (4 * MIB)):
                f.write(os.urandom(4 * MIB))
    age(root)
    return root


def child(user, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "ANYLEARN_HOST": user.backend.url, "ANYLEARN_TOKEN": user.token}
    return subprocess.Popen(
        [sys.executable, str(FIXTURES / "interrupt_child.py"), str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def held_bytes(user, dataset_id: str) -> int:
    """Bytes of the dataset's uploads the server holds (received, or complete)."""
    return sum(u["offset"] for u in user.get("/uploads", params={"resource_id": dataset_id}))


def test_ctrl_c_stops_the_upload_and_the_rerun_resumes(user, tmp_path):
    folder = big_dataset(tmp_path / "data")
    total = 3 * FILE_BYTES
    proc = child(user, folder)
    assert proc.stderr is not None
    dataset_id = None
    for line in proc.stderr:
        found = re.search(r"uploading .* as (dset-[0-9a-f]+)", line)
        if found:
            dataset_id = found.group(1)
            break
    assert dataset_id is not None, "the child never started uploading"
    deadline = time.monotonic() + 60
    while held_bytes(user, dataset_id) < 16 * MIB and time.monotonic() < deadline:
        time.sleep(0.01)
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    took = time.monotonic() - sent_at
    rest = proc.stderr.read()
    out = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()

    assert took <= 1.0, f"the child took {took:.2f} s to stop"
    assert rest.count(INTERRUPTED_MESSAGE) == 1, rest
    assert rest.count("Traceback") == 1 and rest.rstrip().endswith("KeyboardInterrupt"), rest
    assert "During handling" not in rest and "DONE" not in out
    held = held_bytes(user, dataset_id)
    assert 16 * MIB <= held < total  # interrupted mid-way, and the bytes received are kept

    rerun = child(user, folder)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    done = re.search(r"DONE (\S+) (\d+)", out)
    sent = int(re.search(r"SENT (\d+)", out).group(1))
    assert done is not None and done.group(1) == dataset_id  # the same version, taken over
    # It resumed every upload where the server stood: at most one chunk per stream again
    # (the manifest and requests add a few KiB).
    assert total - held <= sent <= total - held + default_streams() * UPLOAD_CHUNK_BYTES
    datasets = user.get("/datasets")
    assert [d["id"] for d in datasets] == [dataset_id] and datasets[0]["state"] == "READY"
