"""Run tasks on an existing Ray cluster (``anylearn server start --executor ray
--ray-address ADDRESS``); Ray (the ``ray`` extra) is imported only here.

The backend stays the quota authority; Ray only places. An admitted attempt:

1. reserves ``num_nodes`` bundles of its request (CPU, GPU, memory) in a detached placement
   group, strategy STRICT_SPREAD (one bundle per node), named ``anylearn-<task>-<attempt>``
   in the backend's own namespace. The task stays QUEUED, its quota held, until the group is
   ready;
2. starts one detached, named actor per bundle (:class:`~.node.NodeAgent`, named
   ``anylearn-<task>-<attempt>-<node>``), which fetches the code and data over HTTP with a
   token scoped to the task and builds the environment on its node;
3. starts each node's ranks with node 0's address as ``MASTER_ADDR`` and a free port there as
   ``MASTER_PORT``; ``NODE_RANK`` is the bundle index. The task is RUNNING from then.

While it runs, each node's log is pulled by offset and appended to the task's log. The
offsets, with the log's size after the last append, are part of the task's record (the
handle), so a backend restarted while the task runs truncates the log to that size, finds the
actors by name and goes on from those offsets: no line lost, none twice. A rank that fails
ends the whole task (the other nodes' ranks are ended: fail fast); a node that dies makes the
attempt lost, and the scheduler runs it again. At the end (and every
:data:`OUTPUT_SYNC_SECONDS`) node 0's output folder is copied back to the backend, and the next
attempt of a lost task starts from that copy (its checkpoints). Cancel and
the end of an attempt remove its actors (their ranks die with them) and its placement group;
when the backend starts, whatever of its namespace no task runs is removed (a sweep).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from sqlalchemy.orm import sessionmaker

from anylearn_sdk.server.db import TrainTask
from anylearn_sdk.server.executors.base import (
    Exited,
    Failed,
    Lost,
    Preparing,
    Running,
    RunSpec,
    Status,
)
from anylearn_sdk.server.executors.node import NodeAgent, pack_folder, unpack_into
from anylearn_sdk.server.executors.ranks import CANCEL_GRACE_SECONDS
from anylearn_sdk.server.workspace import TaskPaths

log = logging.getLogger(__name__)
#: Seconds between two pulls of the nodes' logs and states.
MONITOR_SECONDS = 0.25
#: Seconds between two copies of node 0's output folder to the backend while a task runs.
OUTPUT_SYNC_SECONDS = 30.0
#: Seconds a call to a node agent may take before the node is taken for dead.
CALL_TIMEOUT = 60.0
#: Where nodes keep their caches: ``<root>/<node id>``.
DEFAULT_NODE_CACHE = "/tmp/anylearn-node-cache"  # noqa: S108 - a per-node cache, not secrets
_PREFIX = "anylearn-"
#: A node labelled ``anylearn.io/quota-group=<name>`` (``ray start --labels``) ties that quota
#: group to the nodes so labelled: its tasks run only there.
QUOTA_GROUP_LABEL = "anylearn.io/quota-group"
_Agent = ray.remote(NodeAgent)


def bundle(request: dict[str, float]) -> dict[str, float]:
    """A Ray bundle holding ``request`` (cores, MiB, GPUs) on one node."""
    amounts = {"CPU": float(request.get("cpu", 0)), "GPU": float(request.get("gpu", 0))}
    memory = int(request.get("memory_mb", 0)) * 2**20
    if memory:
        amounts["memory"] = float(memory)
    return {k: v for k, v in amounts.items() if v} or {"CPU": 0.001}


@dataclass
class _Attempt:
    """One attempt on the cluster, followed by its own thread."""

    spec: RunSpec
    names: list[str] = field(default_factory=list)  # the actors' names, by node
    offsets: list[int] = field(default_factory=list)  # of each node's log, pulled so far
    log_size: int = 0  # of the backend's task log after the last pull
    status: Status = field(default_factory=Preparing)
    reported: bool = True  # the handle in ``status`` was reported to the scheduler
    cancelled: threading.Event = field(default_factory=threading.Event)
    detached: threading.Event = field(default_factory=threading.Event)

    @property
    def group(self) -> str:
        return f"{_PREFIX}{self.spec.task_id}-{self.spec.attempt}"

    def handle(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "actors": self.names,
            "log": {"size": self.log_size, "offsets": self.offsets},
        }


class RayExecutor:
    """Runs each attempt as a placement group and one node agent per node (see the module).

    Args:
        address: the cluster (``auto``, ``HOST:PORT`` or ``ray://...``).
        namespace: the Ray namespace of this backend's groups and actors.
        sessions: the backend's database (tasks' tokens are issued there).
        tasks_root: the backend's task folders (logs and outputs).
        backend_url: the backend's address as the nodes reach it.
        node_cache: where each node keeps its cache (``<node_cache>/<node id>``).
        output_sync: seconds between two copies of node 0's output to the backend.
        shared_data: the backend's data folder as the nodes see it, when they share it; they
            then read code and objects from it instead of fetching them.
        issue_token: makes a token scoped to a task (``(session, task) -> secret``).
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str,
        namespace: str,
        sessions: sessionmaker,
        tasks_root: Path,
        backend_url: str,
        issue_token: Callable[[Any, TrainTask], str],
        node_cache: str = DEFAULT_NODE_CACHE,
        output_sync: float = OUTPUT_SYNC_SECONDS,
        shared_data: str | None = None,
    ):
        ray.init(address=address, namespace=namespace, log_to_driver=False)
        self.namespace = namespace
        self.sessions = sessions
        self.tasks_root = tasks_root
        self.backend_url = backend_url
        self.issue_token = issue_token
        self.node_cache = node_cache
        self.output_sync = output_sync
        self.shared_data = shared_data
        self.gpus = 0  # GPUs are Ray's to hand out; the local device count does not apply
        self._attempts: dict[str, _Attempt] = {}
        self._lock = threading.Lock()
        self._listener: Callable[[], object] = lambda: None

    # the interface ---------------------------------------------------------------------------
    def listen(self, callback: Callable[[], object]) -> None:
        self._listener = callback

    def has_room(self, spec: RunSpec) -> bool:
        return True  # an attempt waits for its placement group, QUEUED with its quota held

    def check(self, num_nodes: int, request: dict[str, float], quota_group: str = "") -> None:
        wanted = bundle(request)
        nodes = _nodes_for(quota_group)
        able = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in wanted.items())]
        if len(able) < num_nodes:
            shown = ", ".join(f"{k}={v:g}" for k, v in wanted.items())
            tied = f" labelled {QUOTA_GROUP_LABEL}={quota_group}" if _tied(quota_group) else ""
            raise ValueError(
                f"{num_nodes} node(s) of {shown} each: the Ray cluster has {len(able)} such "
                f"node(s) of {len(nodes)}{tied}"
            )

    def submit(self, spec: RunSpec) -> None:
        attempt = _Attempt(spec)
        with self._lock:
            self._attempts[spec.task_id] = attempt
        self._thread(attempt, self._run, attempt)

    def attach(self, task_id: str, handle: Any) -> None:
        """Follow an attempt from its handle: find its actors by name, truncate the task's
        log to the recorded size and go on pulling from the recorded offsets."""
        try:
            attempt = _Attempt(RunSpec.from_json(handle["spec"]), list(handle["actors"]))
            attempt.offsets = [int(o) for o in handle["log"]["offsets"]]
            attempt.log_size = int(handle["log"]["size"])
        except (KeyError, TypeError, ValueError):
            return  # not a record of this executor: poll answers Lost
        attempt.status = Running()
        with self._lock:
            self._attempts[task_id] = attempt
        self._thread(attempt, self._resume, attempt)

    def recovered(self) -> None:
        """Remove the groups and actors of this namespace that no followed attempt owns
        (those of a backend that died while it placed or ended them)."""
        from ray.util.state import list_actors, list_placement_groups
        from ray.util.state.exception import RayStateApiException

        with self._lock:
            keep = {a.group for a in self._attempts.values()}
        try:
            actors = list_actors(filters=[("ray_namespace", "=", self.namespace)], limit=10_000)
            groups = list_placement_groups(limit=10_000)
        except (RayStateApiException, ConnectionError, TimeoutError):
            # The state API needs the dashboard; the sweep can wait for the next start.
            log.warning("Ray's state API did not answer; nothing was swept", exc_info=True)
            return
        for actor in actors:
            name = actor.name or ""
            group = name.rsplit("-", 1)[0]
            if name.startswith(_PREFIX) and group not in keep and actor.state != "DEAD":
                _kill_actor(name, self.namespace)
        for group in groups:  # only this namespace's are found by name, and so removed
            name = group.name or ""
            if name.startswith(_PREFIX) and name not in keep and group.state != "REMOVED":
                _remove_group(name, self.namespace)

    def poll(self, task_id: str) -> Status:
        with self._lock:
            attempt = self._attempts.get(task_id)
            if attempt is None:
                return Lost("the backend does not know its Ray actors")
            status = attempt.status
            if isinstance(status, Running) and attempt.reported:
                return Running()
            attempt.reported = True
            if isinstance(status, Exited | Lost | Failed):
                self._attempts.pop(task_id, None)
            return status

    def cancel(self, task_id: str) -> None:
        """The attempt's thread ends its ranks (TERM, grace, KILL), pulls the last lines and
        removes its actors and placement group; one still being prepared is removed now."""
        with self._lock:
            attempt = self._attempts.pop(task_id, None)
        if attempt is None:
            return
        attempt.cancelled.set()
        if not isinstance(attempt.status, Running):
            threading.Thread(target=self._end, args=(attempt, None), daemon=True).start()

    def shutdown(self) -> None:
        with self._lock:
            attempts = list(self._attempts.values())
            self._attempts.clear()
        for attempt in attempts:
            attempt.detached.set()  # the actors run on; a restarted backend attaches

    # one attempt, on its own thread ------------------------------------------------------------
    def _thread(self, attempt: _Attempt, target: Callable, *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except Exception as err:  # noqa: BLE001 - the attempt ends; the reason is kept
                log.exception("Ray attempt %s failed", attempt.group)
                self._end(attempt, Lost(f"the Ray executor failed: {err}"))

        threading.Thread(target=run, name=attempt.group, daemon=True).start()

    def _set(self, attempt: _Attempt, status: Status) -> None:
        with self._lock:
            attempt.status = status
            attempt.reported = False
        self._listener()

    def _run(self, attempt: _Attempt) -> None:
        spec = attempt.spec
        paths = TaskPaths.of(self.tasks_root, spec)
        paths.root.mkdir(parents=True, exist_ok=True)
        with self.sessions() as session:
            token = self.issue_token(session, session.get(TrainTask, spec.task_id))
            session.commit()
        selector = {QUOTA_GROUP_LABEL: spec.quota_group} if _tied(spec.quota_group) else {}
        group = placement_group(
            [bundle(spec.request)] * spec.num_nodes,
            strategy="STRICT_SPREAD",
            name=attempt.group,
            lifetime="detached",
            bundle_label_selector=[selector] * spec.num_nodes if selector else None,
        )
        paths.note(f"waiting for {spec.num_nodes} Ray node(s) of {bundle(spec.request)} each")
        while not group.wait(timeout_seconds=1):
            if attempt.cancelled.is_set() or attempt.detached.is_set():
                _remove_group(attempt.group, self.namespace)
                return
        attempt.names = [f"{attempt.group}-{i}" for i in range(spec.num_nodes)]
        agents = [
            _Agent.options(
                name=name,
                lifetime="detached",
                num_cpus=0,
                num_gpus=float(spec.request.get("gpu", 0)),
                max_restarts=0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=i
                ),
            ).remote(spec.to_json(), i, self.backend_url, token, self.node_cache, self.shared_data)
            for i, name in enumerate(attempt.names)
        ]
        try:
            nodes = ray.get([a.where.remote() for a in agents], timeout=CALL_TIMEOUT)
            paths.note(
                "nodes: " + ", ".join(f"{i}={n['node_id'][:12]}" for i, n in enumerate(nodes))
            )
            prepared = ray.get([a.prepare.remote() for a in agents])
            if spec.attempt > 1 and paths.output.is_dir():
                # A later attempt goes on from the output the last one left (its checkpoints).
                ray.get(
                    agents[0].seed_output.remote(pack_folder(paths.output)), timeout=CALL_TIMEOUT
                )
            if attempt.cancelled.is_set():
                self._end(attempt, None)
                return
            master = nodes[0]
            ray.get(
                [a.start.remote(master["address"], master["port"]) for a in agents],
                timeout=CALL_TIMEOUT,
            )
        except RayTaskError as err:
            self._end(attempt, Failed(_cause(err)))
            return
        except (RayActorError, ray.exceptions.GetTimeoutError) as err:
            self._end(attempt, Lost(f"a node agent died while starting: {_cause(err)}"))
            return
        attempt.offsets = [0] * spec.num_nodes
        attempt.log_size = paths.log.stat().st_size if paths.log.exists() else 0
        runtime = {**prepared[0]["runtime"], "nodes": [n["node_id"] for n in nodes]}
        self._set(attempt, Running(attempt.handle(), prepared[0]["command"], runtime))
        self._monitor(attempt, agents, paths)

    def _resume(self, attempt: _Attempt) -> None:
        paths = TaskPaths.of(self.tasks_root, attempt.spec)
        try:
            agents = [ray.get_actor(name, namespace=self.namespace) for name in attempt.names]
        except ValueError:
            self._end(attempt, Lost("its node agents are gone"))
            return
        if paths.log.exists() and paths.log.stat().st_size > attempt.log_size:
            # Lines appended after the last recorded pull are pulled again from its offsets.
            with open(paths.log, "r+b") as f:
                f.truncate(attempt.log_size)
        self._monitor(attempt, agents, paths)

    def _monitor(self, attempt: _Attempt, agents: list, paths: TaskPaths) -> None:
        synced = time.monotonic()
        while not attempt.detached.is_set():
            if attempt.cancelled.is_set():
                self._stop(agents)
                self._pull(attempt, agents, paths, final=True)
                self._end(attempt, None)
                return
            try:
                states = ray.get([a.poll.remote() for a in agents], timeout=CALL_TIMEOUT)
                self._pull(attempt, agents, paths, final=False)
            except (RayActorError, ray.exceptions.GetTimeoutError) as err:
                self._stop(agents)
                # The surviving nodes' last lines (and node 0's last checkpoint) are kept.
                self._pull(attempt, agents, paths, final=True)
                self._sync_output(agents[0], paths)
                self._end(attempt, Lost(f"a node died: {_cause(err)}"))
                return
            failed = [(i, code) for i, (state, code) in enumerate(states) if state != "running"]
            bad = [(i, c) for i, c in failed if c != 0]
            if bad or len(failed) == len(agents):
                if bad:
                    self._stop(agents)  # fail fast across nodes
                self._pull(attempt, agents, paths, final=True)
                self._sync_output(agents[0], paths)
                node, code = bad[0] if bad else (0, 0)
                if code is None:
                    status = Lost(f"a rank on node {node} vanished without an exit status")
                else:
                    status = Exited(code)
                self._end(attempt, status)
                return
            if time.monotonic() - synced > self.output_sync:
                self._sync_output(agents[0], paths)
                synced = time.monotonic()
            time.sleep(MONITOR_SECONDS)

    def _pull(self, attempt: _Attempt, agents: list, paths: TaskPaths, *, final: bool) -> None:
        """Append what each node logged since its offset to the task's log; record the new
        offsets and the log's size together (reported to the scheduler as the handle).

        ``final``: the ranks have ended; each node's rest is taken, partial last line included,
        and a node that does not answer (it died) loses only its own lines. Otherwise a node
        that does not answer raises RayActorError or GetTimeoutError."""
        method = "flush_log" if final else "read_log"
        refs = [getattr(a, method).remote(o) for a, o in zip(agents, attempt.offsets, strict=True)]
        chunks = _answers(refs) if final else ray.get(refs, timeout=CALL_TIMEOUT)
        self._pull_tracking(agents, paths)
        if not any(chunk and chunk[0] for chunk in chunks):
            return
        with open(paths.log, "ab") as out:
            for chunk in chunks:
                if chunk:
                    out.write(chunk[0])
            size = out.tell()
        with self._lock:
            attempt.offsets = [
                chunk[1] if chunk else offset
                for chunk, offset in zip(chunks, attempt.offsets, strict=True)
            ]
            attempt.log_size = size
        self._set(attempt, Running(attempt.handle()))

    def _pull_tracking(self, agents: list, paths: TaskPaths) -> None:
        """Append what each node's ranks logged (:mod:`anylearn_sdk.tracking`) to that node's
        copy, ``.anylearn/tracking-node<N>.jsonl``. A copy is a prefix of the node's file in
        whole lines, so its size is where to read on, after a restart too."""
        copies = [paths.node_tracking(i) for i in range(len(agents))]
        offsets = []
        for copy in copies:
            copy.parent.mkdir(parents=True, exist_ok=True)
            with open(copy, "ab+") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 1))
                if size and f.read(1) != b"\n":
                    # A backend killed mid-append left a partial line: drop it.
                    f.seek(0)
                    size = f.read().rfind(b"\n") + 1
                    f.truncate(size)
            offsets.append(size)
        # A node that does not answer is read again at the next pull, or lost with its node.
        chunks = _answers([a.read_tracking.remote(o) for a, o in zip(agents, offsets, strict=True)])
        for copy, chunk in zip(copies, chunks, strict=True):
            if chunk and chunk[0]:
                with open(copy, "ab") as f:
                    f.write(chunk[0])

    def _sync_output(self, agent: Any, paths: TaskPaths) -> None:
        """Copy node 0's output folder over the backend's (members checked by tarfile's
        ``data`` filter: no absolute paths, links out of it, or devices)."""
        try:
            archive = ray.get(agent.output_archive.remote(), timeout=CALL_TIMEOUT)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return
        except RayTaskError as err:  # a copy that failed is not a lost attempt
            paths.note(f"copying node 0's output back failed: {_cause(err)}")
            return
        unpack_into(archive, paths.output)

    def _stop(self, agents: list) -> None:
        try:
            ray.get([a.cancel.remote(CANCEL_GRACE_SECONDS) for a in agents],
                    timeout=CANCEL_GRACE_SECONDS + CALL_TIMEOUT)  # fmt: skip
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead node's ranks died with its agent

    def _end(self, attempt: _Attempt, status: Status | None) -> None:
        """Remove the attempt's actors (their ranks die with them) and placement group; then
        report ``status`` (None: cancelled, nothing to report)."""
        for name in attempt.names:
            _kill_actor(name, self.namespace)
        _remove_group(attempt.group, self.namespace)
        if status is not None:
            self._set(attempt, status)


def _tied(quota_group: str) -> bool:
    """Whether some live node carries ``anylearn.io/quota-group=<quota_group>``."""
    return bool(quota_group) and any(
        (n.get("Labels") or {}).get(QUOTA_GROUP_LABEL) == quota_group
        for n in ray.nodes()
        if n.get("Alive")
    )


def _nodes_for(quota_group: str) -> list[dict]:
    """The live nodes a task of ``quota_group`` may use: those labelled with its name when
    some are (the group is tied to them), else every one."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if _tied(quota_group):
        nodes = [n for n in nodes if (n.get("Labels") or {}).get(QUOTA_GROUP_LABEL) == quota_group]
    return nodes


def _cause(err: BaseException) -> str:
    """The one-line message of the error behind a Ray error."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def _answers(refs: list) -> list:
    """Each call's result, or None for a call whose actor died or that did not answer within
    :data:`CALL_TIMEOUT` seconds (all calls together)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CALL_TIMEOUT)
    done = set(ready)
    results = []
    for ref in refs:
        try:
            results.append(ray.get(ref) if ref in done else None)
        except RayActorError:
            results.append(None)
    return results


def _kill_actor(name: str, namespace: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:
        pass  # already gone


def _remove_group(name: str, namespace: str) -> None:
    from ray.util import get_placement_group

    try:
        remove_placement_group(get_placement_group(name))
    except ValueError:
        pass  # already gone
