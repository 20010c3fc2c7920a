"""The Ray executor's suite (``tests/on_ray/``), run inside a network namespace that has only
loopback (``unshare -n``), since Ray binds the host's address: nothing but loopback is used.

It needs root (to make the namespace) and Ray (``pip install 'anylearn-sdk[ray]'``); where
either is missing the test is skipped, unless ``ANYLEARN_TEST_REQUIRE`` names ``ray`` (as
``.ci/run`` does), which fails it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ray_suite_in_a_loopback_only_network(tmp_path):
    missing = []
    if importlib.util.find_spec("ray") is None:
        missing.append("Ray (pip install 'anylearn-sdk[ray]')")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        missing.append("root with unshare and ip (a loopback-only network namespace)")
    if missing:
        if "ray" in os.environ.get("ANYLEARN_TEST_REQUIRE", "").split(","):
            pytest.fail("the Ray tests need " + " and ".join(missing))
        pytest.skip("the Ray tests need " + " and ".join(missing))
    # Nothing but loopback exists in there, package registries included: the environments
    # the nodes build (the distributed example's torch) install from a wheelhouse filled here.
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
         "-r", str(ROOT / "examples" / "distributed" / "requirements.txt")],
        check=True,
        timeout=900,
    )  # fmt: skip
    find_links = " ".join(filter(None, [str(wheels), os.environ.get("PIP_FIND_LINKS")]))
    pytest_cmd = f"{sys.executable} -m pytest -p no:cacheprovider -q tests/on_ray"
    inner = f"ip link set lo up && exec {pytest_cmd}"
    run = subprocess.run(
        ["unshare", "--net", "sh", "-c", inner],
        cwd=ROOT,
        env={
            **os.environ,
            "ANYLEARN_RAY_NETNS": "1",
            "PIP_FIND_LINKS": find_links,
            "PIP_NO_INDEX": "1",
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    # Ray warns on every start that it found no external address (there is none, by design).
    out = "\n".join(line for line in run.stdout.splitlines() if "network_util" not in line)
    assert run.returncode == 0, out[out.find("= FAILURES =") :][:12000] + run.stderr[-2000:]
