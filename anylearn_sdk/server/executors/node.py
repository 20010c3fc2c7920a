"""What runs on each node of a Ray task: a node agent that fetches the task's code and data from
the backend over HTTP, starts that node's ranks, and answers the backend's questions.

Nothing reaches a node through a shared folder or Ray's ``runtime_env``: the exact commit
comes over the backend's git endpoint (``refs/anylearn/commits/<sha>``), each object the node
lacks by sha256 from ``GET /api/v1/objects/<sha256>``, both with a token scoped to the task.
Every object is verified as it is written into the node's content-addressed cache
(``<cache>/objects``), and mounts are laid out by hard links from there, as on the backend.
Environments are built per node under the same cache key as on the backend. The cache lives
in ``<cache root>/<node id>``, so nodes sharing a machine keep separate caches.

This module does not import Ray: :mod:`anylearn_sdk.server.executors.ray` makes
:class:`NodeAgent` an actor.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from anylearn_sdk.protocol import ManifestEntry
from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.environments import EnvironmentBuildError, Environments
from anylearn_sdk.server.executors.base import Exited, Lost, Running, RunSpec
from anylearn_sdk.server.executors.ranks import (
    Rank,
    end_ranks,
    follow_ranks,
    free_port,
    spawn_ranks,
)
from anylearn_sdk.server.objects import ObjectStore
from anylearn_sdk.server.workspace import Prepared, PrepareError, Preparer, TaskPaths
from anylearn_sdk.wire import API_PREFIX

#: Objects fetched at once.
FETCH_WORKERS = 4
#: Seconds one HTTP request to the backend may take before the fetch fails.
FETCH_TIMEOUT = 300
#: Bytes of a node's log answered by one :meth:`NodeAgent.read_log`.
LOG_CHUNK = 1 << 20


class NodeWorkspace(Preparer):
    """Prepares an attempt on a node from the backend, over HTTP, into a per-node cache."""

    def __init__(self, cache: Path, backend_url: str, token: str, shared_data: Path | None = None):
        self.cache = cache
        super().__init__(
            tasks_root=cache / "tasks", environments=Environments(cache / "environments")
        )
        #: The backend's data folder, when this node shares it: code and objects are read
        #: from there instead of fetched (manifests still come over HTTP).
        self.shared_data = shared_data
        self.objects = ObjectStore((shared_data or cache) / "objects")
        self.backend_url = backend_url.rstrip("/")
        self._token = token
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.fetched = {"objects": 0, "bytes": 0}

    def paths(self, spec: RunSpec) -> TaskPaths:
        """The task's folder on this node; its log is the attempt's own, so the backend pulls
        a later attempt's lines from offset 0 without the earlier ones."""
        paths = super().paths(spec)
        paths.log = paths.root / f"attempt-{spec.attempt}.log"
        return paths

    def _api(self, path: str) -> str:
        return f"{self.backend_url}{API_PREFIX}{path}"

    def checkout(self, spec: RunSpec, dest: Path) -> None:
        repo = (self.shared_data or self.cache) / "repos" / f"{spec.algorithm_id}.git"
        if not repo.is_dir() and self.shared_data is None:
            # Made aside and renamed into place: agents of two tasks may get here at once.
            staging = repo.with_name(f".{repo.name}.{os.getpid()}.{threading.get_ident()}")
            gitrepos.init_bare(staging)
            try:
                staging.rename(repo)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # the other one's is as good
        if self.shared_data is None and not gitrepos.has_commit(repo, spec.commit):
            ref = f"refs/anylearn/commits/{spec.commit}"
            env = {
                **os.environ,
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_COUNT": "1",  # the token in a header, never in a URL or a file
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Bearer {self._token}",
            }
            url = self._api(f"/algorithms/{spec.algorithm_id}/git")
            result = subprocess.run(
                ["git", "--git-dir", str(repo), "fetch", "--no-tags", url, f"+{ref}:{ref}"],
                env=env,
                capture_output=True,
                timeout=gitrepos.GIT_TIMEOUT_SECONDS,
            )
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip().splitlines()
                raise PrepareError(f"git fetch of {spec.commit} failed: {message[-1:]}")
        try:
            gitrepos.checkout(repo, spec.commit, dest)
        except RuntimeError as err:
            raise PrepareError(str(err)) from err

    def mount_path(self, spec: RunSpec, kind: str, ref: str) -> Path:
        if kind == "pretrain":
            raise PrepareError("pretrain mounts are not supported on the Ray executor yet")
        answer = self.http.get(
            self._api(f"/{kind}s/{ref}"), params={"manifest": "true"}, timeout=FETCH_TIMEOUT
        )
        if answer.status_code != 200:
            raise PrepareError(f"{kind} {ref}: the backend answered {answer.status_code}")
        manifest = [ManifestEntry.from_json(e) for e in answer.json()["manifest"]]
        dest = self.cache / "materialized" / ref
        if not dest.exists():
            self._fetch(sorted({e.sha256: e.size for e in manifest}.items()))
            self.objects.materialize(manifest, dest)
        return dest

    def _fetch(self, objects: list[tuple[str, int]]) -> None:
        """Fetch and verify the objects the cache lacks, on a few threads."""
        lacking = [(sha, size) for sha, size in objects if not self.objects.has(sha)]

        def one(item: tuple[str, int]) -> None:
            sha, size = item
            with self.http.get(self._api(f"/objects/{sha}"), stream=True,
                               timeout=FETCH_TIMEOUT) as answer:  # fmt: skip
                if answer.status_code != 200:
                    raise PrepareError(f"object {sha}: the backend answered {answer.status_code}")
                answer.raw.decode_content = True
                self.objects.ingest(answer.raw, sha, size)  # verifies digest and size

        with ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="anylearn-fetch") as pool:
            list(pool.map(one, lacking))
        self.fetched["objects"] += len(lacking)
        self.fetched["bytes"] += sum(size for _, size in lacking)


class NodeAgent:
    """One node of one attempt (a detached, named Ray actor in its bundle).

    The backend calls :meth:`prepare` on every node, then :meth:`start` with node 0's
    address and port, then polls :meth:`poll` and :meth:`read_log`; :meth:`cancel` ends the
    ranks. The ranks die with the agent (its node died, or it was killed).
    """

    def __init__(
        self,
        spec: dict,
        node_rank: int,
        backend_url: str,
        token: str,
        cache: str,
        shared_data: str | None = None,
    ):
        self.spec = RunSpec.from_json(spec)
        self.node_rank = node_rank
        shared = Path(shared_data) if shared_data else None
        self.workspace = NodeWorkspace(Path(cache) / _node_id(), backend_url, token, shared)
        self.paths = self.workspace.paths(self.spec)
        self.ranks: list[Rank] | None = None
        self.prepared: Prepared | None = None
        self.runtime: dict[str, Any] = {}
        self._lock = threading.Lock()

    def where(self) -> dict[str, Any]:
        """This node's address, a free port on it (for node 0: ``MASTER_PORT``) and its
        cache folder."""
        import ray  # only ever called inside an actor

        return {
            "address": ray.util.get_node_ip_address(),
            "port": free_port(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "cache": str(self.workspace.cache),
        }

    def prepare(self) -> dict[str, Any]:
        """Fetch code and data, build the environment; returns what was fetched. Raises
        PrepareError or EnvironmentBuildError (the task fails with its message)."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        prepared = self.workspace.prepare(self.spec)
        venv = prepared.build.result() if prepared.build is not None else None
        self.runtime = prepared.finish(venv)
        self.prepared = prepared
        fetched = dict(self.workspace.fetched)
        self.paths.note(
            f"node {self.node_rank}: fetched {fetched['objects']} objects "
            f"({fetched['bytes']} bytes) from the backend"
        )
        return {"fetched": fetched, "command": prepared.command, "runtime": self.runtime}

    def start(self, master_addr: str, master_port: int) -> list[int]:
        """Start this node's ranks; returns their pids."""
        prepared = self.prepared
        if prepared is None:
            raise PrepareError("start before prepare")
        with self._lock:
            self.ranks = spawn_ranks(
                command=prepared.command,
                env={**prepared.env, **_ray_devices(), "ANYLEARN_NODE_ID": _node_id()},
                cwd=self.paths.code,
                log_path=self.paths.log,
                status_dir=self.paths.status,
                node_rank=self.node_rank,
                num_nodes=self.spec.num_nodes,
                nproc_per_node=self.spec.nproc_per_node,
                master_addr=master_addr,
                master_port=master_port,
                die_with_parent=True,
            )
        return [r.pid for r in self.ranks]

    def poll(self) -> tuple[str, int | None]:
        """``("running", None)``, ``("exited", code)`` or ``("lost", None)``."""
        with self._lock:
            if self.ranks is None:
                return ("running", None)
            status = follow_ranks(self.ranks)
        match status:
            case Running():
                return ("running", None)
            case Exited(code=code):
                return ("exited", code)
            case Lost():
                return ("lost", None)
        return ("lost", None)

    def read_log(self, offset: int) -> tuple[bytes, int]:
        """Up to :data:`LOG_CHUNK` bytes of this node's log from ``offset``, ending at a line
        end unless the chunk is full; and the offset after them."""
        return _read_lines(self.paths.log, offset)

    def flush_log(self, offset: int) -> tuple[bytes, int]:
        """The rest of the log from ``offset``, partial last line included (the ranks ended)."""
        with open(self.paths.log, "rb") as f:
            f.seek(offset)
            data = f.read()
        return data, offset + len(data)

    def read_tracking(self, offset: int) -> tuple[bytes, int]:
        """As :meth:`read_log`, of the file this node's ranks append metrics to
        (:mod:`anylearn_sdk.tracking`); whole lines only, since a rank writes each at once."""
        data, _ = _read_lines(self.paths.tracking, offset)
        data = data[: data.rfind(b"\n") + 1]
        return data, offset + len(data)

    def cancel(self, grace: float) -> None:
        """End every rank (SIGTERM, SIGKILL after ``grace`` seconds); returns when they are."""
        with self._lock:
            ranks = self.ranks or []
        if ranks:
            end_ranks(ranks, grace).join()

    def seed_output(self, archive: bytes) -> None:
        """Lay the output a lost attempt left (:func:`pack_folder`) into the output folder."""
        unpack_into(archive, self.paths.output)
        self.paths.note(f"node {self.node_rank}: output of the last attempt laid in place")

    def output_archive(self) -> bytes:
        """The output folder (:func:`pack_folder`)."""
        return pack_folder(self.paths.output)


def _read_lines(path: Path, offset: int) -> tuple[bytes, int]:
    """Up to :data:`LOG_CHUNK` bytes of ``path`` from ``offset``, ending at a line end unless
    the chunk is full (nothing if the file is missing); and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(LOG_CHUNK)
    except FileNotFoundError:
        return b"", offset
    if len(data) < LOG_CHUNK and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    return data, offset + len(data)


def pack_folder(folder: Path) -> bytes:
    """``folder`` as an uncompressed tar, members relative to it (empty if it is missing).

    The ranks may be writing while it is packed (a periodic output sync): each regular file
    is read to its end first and stored as read, so a member's header always gives the bytes
    that follow it, never more. A file rewritten while it was read may hold the start of one
    version and the rest of the next (as ``rsync`` or ``cp`` would copy it); the next sync
    has a whole one. A file that vanished meanwhile is left out."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if folder.is_dir():
            for item in sorted(folder.rglob("*")):
                name = str(item.relative_to(folder))
                try:
                    info = tar.gettarinfo(str(item), arcname=name)
                    if not info.isreg():
                        tar.addfile(info)
                        continue
                    data = item.read_bytes()
                except (FileNotFoundError, NotADirectoryError):
                    continue
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack_into(archive: bytes, folder: Path) -> None:
    """Extract :func:`pack_folder`'s ``archive`` over ``folder``, every member checked by
    tarfile's ``data`` filter (no absolute paths, no links out of it, no devices)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _ray_devices() -> dict[str, str]:
    """The GPUs Ray gave this actor, as ``CUDA_VISIBLE_DEVICES`` (empty: none)."""
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}


__all__ = ["EnvironmentBuildError", "NodeAgent", "NodeWorkspace", "PrepareError"]
