"""A task's working folder on the machine that runs it, and how it is prepared.

Preparing an attempt means: check out the exact commit, lay out the mounted datasets, models
and earlier results read-only, build the command line (the entrypoint with its placeholders
filled, then the formatted hyperparameters) and the environment every rank gets, and start (or
join) the build of the virtual environment the commit's ``requirements.txt`` asks for. The
local executor does this on the backend's machine, from the backend's own repositories and
object store (:class:`Workspace`); the command line and variables are built the same way
wherever a task runs (:func:`task_command`).
"""

from __future__ import annotations

import os
import shlex
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from anylearn_sdk.protocol import (
    MOUNT_ENV_VARS,
    ManifestEntry,
    format_hyperparams,
    substitute_placeholders,
)
from anylearn_sdk.server import gitrepos
from anylearn_sdk.server.api.resources import users_of
from anylearn_sdk.server.db import Resource, TrainTask
from anylearn_sdk.server.environments import REQUIREMENTS_FILE, Environments
from anylearn_sdk.server.executors.base import RunSpec
from anylearn_sdk.server.objects import ObjectStore
from anylearn_sdk.states import ResourceState
from anylearn_sdk.tracking import TRACKING_FILE_ENV, TRACKING_FILE_NAME

#: Variables of the server's environment that a task inherits; nothing else leaks (no tokens).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "USER")
#: Mount kinds, in the order their folders are resolved.
MOUNT_KINDS = ("dataset", "model", "pretrain")
#: Earlier versions of a dataset looked at for a laid-out tree to start a new one from.
BASE_CANDIDATES = 5


class PrepareError(RuntimeError):
    """The task cannot start (bad commit, output path taken in the commit, missing data)."""


class TaskPaths:
    """A task's folder: ``<root>/<id>/{code,task.log,.anylearn}``."""

    LOG_NAME = "task.log"

    def __init__(self, tasks_root: Path, task_id: str, output: str = "output"):
        self.root = tasks_root / task_id
        self.code = self.root / "code"
        self.log = self.root / self.LOG_NAME
        self.bin = self.root / ".anylearn" / "bin"
        self.status = self.root / ".anylearn" / "status"
        #: Where ``log_metrics`` and friends append (:mod:`anylearn_sdk.tracking`).
        self.tracking = self.root / ".anylearn" / TRACKING_FILE_NAME
        self.output = self.code / output

    def node_tracking(self, node_rank: int) -> Path:
        """The copy of node ``node_rank``'s tracking file, pulled by the Ray executor."""
        return self.tracking.with_name(f"tracking-node{node_rank}.jsonl")

    @classmethod
    def of(cls, tasks_root: Path, task: TrainTask | RunSpec) -> TaskPaths:
        task_id = task.task_id if isinstance(task, RunSpec) else task.id
        return cls(tasks_root, task_id, task.output)

    def note(self, text: str) -> None:
        """Append ``[anylearn] text`` to the task's log, if its folder exists."""
        if self.root.is_dir():
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"[anylearn] {text}\n")


def search_path(*dirs: Path) -> str:
    """``PATH`` for a task: ``dirs`` first, then the server's own ``PATH``."""
    return os.pathsep.join([*map(str, dirs), os.environ.get("PATH", "/usr/bin:/bin")])


def task_command(
    spec: RunSpec, paths: TaskPaths, mounts: dict[str, list[Path]]
) -> tuple[str, dict[str, str]]:
    """The command line and the variables every rank of ``spec`` gets (besides the per-rank
    ones), for a task laid out in ``paths`` with ``mounts`` (kind to folders).

    The entrypoint's and the hyperparameters' ``$ANYLEARN_*`` placeholders are filled from
    those variables; a mount with a ``hyperparam_name`` is also passed as that hyperparameter
    unless the user set it.
    """
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PATH"] = search_path(paths.bin)
    env.update(
        PYTHONUNBUFFERED="1", ANYLEARN_TASK_ID=spec.task_id, ANYLEARN_ATTEMPT=str(spec.attempt)
    )
    env[MOUNT_ENV_VARS["output"]] = str(paths.output)
    env[TRACKING_FILE_ENV] = str(paths.tracking)
    mount_params: dict[str, str] = {}
    for kind, folders in mounts.items():
        value = ",".join(map(str, folders))
        env[MOUNT_ENV_VARS[kind]] = value
        name = (spec.mounts.get(kind) or {}).get("hyperparam_name")
        if name:
            mount_params[name] = value
    hyperparams = {k: substitute_placeholders(str(v), env) for k, v in spec.hyperparams.items()}
    for name, value in mount_params.items():
        hyperparams.setdefault(name, value)
    words = format_hyperparams(hyperparams, spec.hyperparams_prefix, spec.hyperparams_delimiter)
    return " ".join([substitute_placeholders(spec.entrypoint, env), *words]), env


def check_output(spec: RunSpec, paths: TaskPaths) -> None:
    """Create the output folder; refuse one the commit already fills.

    Raises:
        PrepareError: the output path is a symlink or a non-empty folder in the commit.
    """
    if paths.output.is_symlink() or (paths.output.exists() and any(paths.output.iterdir())):
        raise PrepareError(
            f"output {spec.output!r} exists in commit {spec.commit} and is not empty"
        )
    paths.output.mkdir(parents=True, exist_ok=True)


def write_python_shim(bin_dir: Path, python: str) -> None:
    """Make ``python`` and ``python3`` in ``bin_dir`` run ``python``.

    They are ``exec`` scripts, not symlinks: Python finds a venv's ``pyvenv.cfg`` next to the
    path it was started by, so a symlink elsewhere to a venv's interpreter would run the base
    interpreter without the venv's packages.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        shim = bin_dir / name
        if shim.is_symlink() or shim.exists():
            shim.unlink()
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} "$@"\n')
        shim.chmod(0o755)


@dataclass
class Prepared:
    """An attempt ready to start once its environment (if any) is built."""

    spec: RunSpec
    paths: TaskPaths
    command: str
    env: dict[str, str]
    environment: str | None  # the environment's key; None without a requirements.txt
    build: Future[Path] | None
    environments: Environments

    def finish(self, venv: Path | None) -> dict:
        """Point the task's ``python`` at the mirror or at the built ``venv``; the runtime
        record of the attempt: interpreter, environment, variables, and the interpreter's
        version and packages (:meth:`Environments.describe`, once per interpreter)."""
        python = self.spec.python
        if venv is not None:
            python = str(venv / "bin" / "python")
            self.env.update(PATH=search_path(self.paths.bin, venv / "bin"), VIRTUAL_ENV=str(venv))
        write_python_shim(self.paths.bin, python)
        runtime = {"environment": self.environment, "python": python, "env": self.env}
        return runtime | self.environments.describe(python)


class Preparer:
    """Prepares attempts in ``tasks_root``; subclasses say where code and data come from."""

    def __init__(self, *, tasks_root: Path, environments: Environments):
        self.tasks_root = tasks_root
        self.environments = environments

    def paths(self, spec: RunSpec) -> TaskPaths:
        return TaskPaths.of(self.tasks_root, spec)

    def checkout(self, spec: RunSpec, dest: Path) -> None:
        """Write the tree of ``spec.commit`` into ``dest``; raise PrepareError if it cannot."""
        raise NotImplementedError

    def mount_path(self, spec: RunSpec, kind: str, ref: str) -> Path:
        """The folder of mount ``ref`` (a dataset, model or earlier task) of ``kind``."""
        raise NotImplementedError

    def prepare(self, spec: RunSpec) -> Prepared:
        """Check out the code, materialize the mounts, build the command line, and start (or
        join) the build of the environment its requirements.txt asks for. Slow: runs on an
        executor's thread, never under the scheduler's lock.

        Raises:
            PrepareError: the commit, a mount or the requirements file cannot be used.
        """
        paths = self.paths(spec)
        paths.root.mkdir(parents=True, exist_ok=True)
        if spec.attempt > 1 and paths.code.is_dir():
            # A re-run continues in the working directory it was lost in, output included.
            paths.note(f"attempt {spec.attempt}, in the same working directory")
        else:
            self.checkout(spec, paths.code)
            check_output(spec, paths)
        mounts = {
            kind: [self.mount_path(spec, kind, ref) for ref in ids]
            for kind in MOUNT_KINDS
            if (ids := (spec.mounts.get(kind) or {}).get("ids"))
        }
        command, env = task_command(spec, paths, mounts)
        requirements = paths.code / REQUIREMENTS_FILE
        if not requirements.is_file():
            return Prepared(spec, paths, command, env, None, None, self.environments)
        try:
            key, build = self.environments.ensure(spec.python, requirements, paths.log)
        except OSError as err:
            raise PrepareError(f"cannot read {REQUIREMENTS_FILE}: {err}") from err
        return Prepared(spec, paths, command, env, key, build, self.environments)


class Workspace(Preparer):
    """Prepares attempts on the backend's machine, from its repositories and object store."""

    def __init__(
        self,
        *,
        sessions: sessionmaker,
        objects: ObjectStore,
        repos_root: Path,
        tasks_root: Path,
        materialized_root: Path,
        environments: Environments,
    ):
        super().__init__(tasks_root=tasks_root, environments=environments)
        self.sessions = sessions
        self.objects = objects
        self.repos_root = repos_root
        self.materialized_root = materialized_root
        self._layout_lock = threading.Lock()

    def checkout(self, spec: RunSpec, dest: Path) -> None:
        try:
            gitrepos.checkout(self.repos_root / f"{spec.algorithm_id}.git", spec.commit, dest)
        except RuntimeError as err:
            raise PrepareError(str(err)) from err

    def mount_path(self, spec: RunSpec, kind: str, ref: str) -> Path:
        with self.sessions() as session:
            if kind == "pretrain":
                earlier = session.get(TrainTask, ref)
                if earlier is None:
                    raise PrepareError(f"pretrain task {ref} no longer exists")
                return TaskPaths.of(self.tasks_root, earlier).output
            res = session.get(Resource, ref)
            if res is None or res.state != ResourceState.READY:
                raise PrepareError(f"{kind} {ref} is not READY")
            dest = self.materialized_root / res.id
            # One layout at a time: a tree is moved only while no task can be looking at it.
            with self._layout_lock:
                if not dest.exists():
                    entries = res.entries()
                    base = self._laid_out_base(session, res)
                    # A base that no queued or running task mounts is moved, not copied.
                    unused = base is not None and not users_of(session, res.kind, base[2])
                    self.objects.materialize(
                        entries, dest, base[:2] if base else None, take_base=unused
                    )
            return dest

    def _laid_out_base(
        self, session: Session, res: Resource
    ) -> tuple[Path, list[ManifestEntry], str] | None:
        """The newest other READY version of the same name and owner that is laid out (its
        tree, manifest and id), from which ``res`` is laid out by changing what differs."""
        earlier = session.scalars(
            select(Resource)
            .where(
                Resource.owner_id == res.owner_id,
                Resource.kind == res.kind,
                Resource.name == res.name,
                Resource.state == ResourceState.READY,
                Resource.id != res.id,
            )
            .order_by(Resource.created_at.desc())
            .limit(BASE_CANDIDATES)
        )
        for other in earlier:
            tree = self.materialized_root / other.id
            if tree.is_dir():
                return tree, other.entries(), other.id
        return None
