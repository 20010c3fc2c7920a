"""The inner Ray suite: a two-node Ray cluster on this machine and a backend on it, inside a
network namespace that has only loopback (``tests/test_ray.py`` starts this suite there).

The nodes are two raylets of one machine (``ray.cluster_utils.Cluster``), each with 2
logical CPUs; each keeps its cache in a folder of its own (``<cache>/<node id>``), so nothing
passes through a shared folder.
"""

from __future__ import annotations

import socket

import pytest
from ray.cluster_utils import Cluster

from tests.conftest import admin_token, start_server


def loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@pytest.fixture(scope="session")
def cluster():
    assert loopback_only(), "the Ray tests must run where only loopback exists"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "labels": {"anylearn.io/node": "head"}},
    )
    cluster.add_node(
        num_cpus=2,
        labels={"anylearn.io/node": "worker", "anylearn.io/quota-group": "worker-only"},
    )
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


class RayBackend:
    """A backend on the cluster; node 0's output is copied back every second."""

    def __init__(self, data_dir, cache, address, *options: str):
        self.data_dir, self.cache, self.address = data_dir, cache, address
        self.options = options
        self.proc = None
        self.url = ""

    def start(self):
        self.proc, self.url = start_server(
            self.data_dir,
            "--executor", "ray",
            "--ray-address", self.address,
            "--ray-node-cache", str(self.cache),
            "--ray-output-sync", "1",
            *self.options,
        )  # fmt: skip
        return self

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    @property
    def token(self) -> str:
        return admin_token(self.data_dir)


@pytest.fixture(scope="session")
def ray_backend(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-backend")
    backend = RayBackend(root / "data", root / "node-cache", cluster.address).start()
    yield backend
    backend.stop()


@pytest.fixture(scope="session")
def driver(cluster):
    """The test process connected to the cluster, for Ray's state API."""
    import ray

    ray.init(address=cluster.address, namespace="anylearn-tests", log_to_driver=False)
    yield
    ray.shutdown()
