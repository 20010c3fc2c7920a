"""Virtual environments for algorithms that carry a ``requirements.txt``.

An environment is a venv layered over its mirror's interpreter: its own ``site-packages``
comes first, then the mirror's (a ``.pth`` file adds them with ``site.addsitedir``), so a
requirement the mirror already satisfies is not installed again and one it pins differently
wins. This is how Ray's ``runtime_env`` ``pip`` field builds on the cluster's Python.

Environments are cached by ``(mirror interpreter, sha256 of requirements.txt)``: built once,
then reused by every task that asks for the same. Layout under the root::

    <key>/current          -> build-<n>       (symlink, swapped in once a build succeeded)
    <key>/build-<n>/       the venv
    <key>/build-<n>.log    pip's output

A build that a server crash interrupted never became ``current``; the next build of that key
removes it. While a build runs, every task that waits for it gets its output in its own log:
what was written so far when it joins, then each line as pip prints it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)
REQUIREMENTS_FILE = "requirements.txt"
#: Variables of the server's environment a build sees, besides ``PIP_*``.
_BUILD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
#: Changes whenever the layout of a built environment changes, so old ones are not reused.
LAYOUT_VERSION = b"anylearn-env-1"
#: Lists the site directories of the interpreter it runs in.
_SITE_DIRS = (
    "import json, sys; "
    "print(json.dumps([p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))]))"
)


#: Prints the interpreter's version and every distribution it imports from, ``name==version``
#: (what ``pip freeze`` lists, without pip): in a built environment, its own packages and the
#: mirror's it is layered over.
_DESCRIBE = (
    "import importlib.metadata as m, json, platform; "
    "names = {f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions() "
    "if d.metadata['Name']}; "
    "print(json.dumps({'python_version': platform.python_version(), "
    "'packages': sorted(names, key=str.lower)}))"
)
#: Seconds the description of an interpreter may take.
DESCRIBE_TIMEOUT = 60.0


class EnvironmentBuildError(RuntimeError):
    """Building an environment failed; the message ends with pip's last error line."""


def environment_key(python: str, requirements: bytes) -> str:
    """The cache key of an environment: 24 hex digits of sha256(layout, interpreter, file)."""
    digest = hashlib.sha256(LAYOUT_VERSION + b"\0" + python.encode() + b"\0" + requirements)
    return digest.hexdigest()[:24]


#: In a built environment's folder: its :meth:`Environments.describe`.
DESCRIPTION_FILE = "anylearn-description.json"


class _Build:
    """One running build: its future, its log so far and the task logs that follow it."""

    def __init__(self, log_path: Path):
        self.future: Future[Path] = Future()
        self.log_path = log_path
        self.followers: list[Path] = []
        self.lock = threading.Lock()

    def follow(self, task_log: Path, note: str) -> None:
        with self.lock:
            with open(task_log, "ab") as out:
                out.write(note.encode())
                if self.log_path.exists():
                    out.write(self.log_path.read_bytes())
            self.followers.append(task_log)

    def write(self, line: bytes) -> None:
        with self.lock:
            with open(self.log_path, "ab") as own:
                own.write(line)
            for path in self.followers:
                with open(path, "ab") as out:
                    out.write(line)


#: Seconds one build step (``python -m venv``, ``pip install``) may take before it is killed.
DEFAULT_BUILD_TIMEOUT = 1800.0


class Environments:
    """Builds and caches environments; at most ``workers`` builds run at once.

    Builds see the server's ``PIP_*`` variables (index, certificates, timeouts) and pip's
    configuration files; tasks do not get those variables.

    Args:
        root: folder the environments live in.
        workers: builds that may run at once.
        build_timeout: seconds a build step may run; then it is killed and the build fails.
    """

    def __init__(
        self, root: Path, *, workers: int = 2, build_timeout: float = DEFAULT_BUILD_TIMEOUT
    ):
        self.build_timeout = build_timeout
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._builds: dict[str, _Build] = {}
        self._lock = threading.Lock()
        self._described: dict[str, dict] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anylearn-env")

    def ready(self, key: str) -> Path | None:
        """The venv folder of a built environment, or None."""
        current = self.root / key / "current"
        if not current.is_symlink():
            return None
        venv = current.resolve()
        return venv if venv.is_dir() else None

    def ensure(self, python: str, requirements: Path, task_log: Path) -> tuple[str, Future[Path]]:
        """The environment's key and a future of its venv folder, for ``requirements`` over
        interpreter ``python``.

        A built environment answers at once (the task log says it is reused); a running build
        of the same key is joined; otherwise a build starts on a worker thread. The future
        fails with :class:`EnvironmentBuildError` if pip fails; the task log then holds pip's
        output.
        """
        content = requirements.read_bytes()
        key = environment_key(python, content)
        with self._lock:
            venv = self.ready(key)
            if venv is not None:
                _append(task_log, f"[anylearn] environment {key} is built; reusing it\n")
                done: Future[Path] = Future()
                done.set_result(venv)
                return key, done
            build = self._builds.get(key)
            if build is not None:
                build.follow(task_log, f"[anylearn] joining the build of environment {key}\n")
                return key, build.future
            build_dir = self.root / key / f"build-{uuid.uuid4().hex[:12]}"
            build = _Build(build_dir.with_suffix(".log"))
            self._builds[key] = build
            build_dir.parent.mkdir(parents=True, exist_ok=True)
            build.follow(
                task_log,
                f"[anylearn] building environment {key} from {REQUIREMENTS_FILE} over {python}\n",
            )
        self._pool.submit(self._build, key, python, content, build_dir, build)
        return key, build.future

    def describe(self, python: str) -> dict:
        """``{"python_version": "3.11.2", "packages": ["name==version", ...]}`` for the
        interpreter ``python`` (a mirror's, or a built environment's ``bin/python``); ``{}``
        if it cannot be asked. Captured once per interpreter: kept in memory, and for a built
        environment in a file next to it, so a restarted backend does not ask again."""
        with self._lock:
            if python in self._described:
                return self._described[python]
        saved = Path(python).parent.parent / DESCRIPTION_FILE
        inside = Path(python).is_relative_to(self.root)
        try:
            description = json.loads(saved.read_text()) if inside else None
        except (OSError, ValueError):
            description = None
        if not isinstance(description, dict):
            try:
                out = subprocess.run(
                    [python, "-c", _DESCRIBE],
                    capture_output=True,
                    check=True,
                    env=_clean_env(),
                    timeout=DESCRIBE_TIMEOUT,
                )
                description = json.loads(out.stdout)
            except (OSError, ValueError, subprocess.SubprocessError):
                return {}
            if inside:
                with contextlib.suppress(OSError):
                    saved.write_text(json.dumps(description))
        with self._lock:
            self._described[python] = description
        return description

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # the build -------------------------------------------------------------------------------
    def _build(self, key: str, python: str, content: bytes, build_dir: Path, build: _Build) -> None:
        try:
            for stale in build_dir.parent.glob("build-*"):
                if stale != build_dir and stale != build_dir.with_suffix(".log"):
                    _remove(stale)
            self._run(build, "python -m venv", [python, "-m", "venv", str(build_dir)])
            self._layer_over(python, build_dir)
            req_file = build_dir / REQUIREMENTS_FILE
            req_file.write_bytes(content)
            pip = [str(build_dir / "bin" / "python"), "-m", "pip", "install", "--no-input"]
            self._run(build, "pip install -r requirements.txt", [*pip, "-r", str(req_file)])
            current = build_dir.parent / "current"
            tmp = build_dir.parent / f".current-{build_dir.name}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(build_dir.name)
            os.replace(tmp, current)
            build.write(f"[anylearn] environment {key} is ready\n".encode())
            build.future.set_result(build_dir)
        except Exception as err:  # noqa: BLE001 - every failure ends the waiting tasks
            failure = err if isinstance(err, EnvironmentBuildError) else EnvironmentBuildError(err)
            build.write(f"[anylearn] environment {key} failed: {failure}\n".encode())
            _remove(build_dir)
            build.future.set_exception(failure)
        finally:
            with self._lock:
                self._builds.pop(key, None)

    def _run(self, build: _Build, what: str, argv: list[str]) -> None:
        """Run ``argv``, its output line by line into the build's logs; raise on failure, or
        once it has run ``build_timeout`` seconds (it is killed then)."""
        env = _clean_env()
        env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            argv,
            cwd=build.log_path.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        last_line = last_error = ""
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        killer = threading.Timer(self.build_timeout, kill)
        killer.start()
        try:
            with proc.stdout as output:  # type: ignore[union-attr] - a PIPE is always there
                for line in output:
                    build.write(line)
                    text = line.decode(errors="replace").strip()
                    last_line = text or last_line
                    last_error = text if text.startswith("ERROR:") else last_error
            code = proc.wait()
        finally:
            killer.cancel()
        if timed_out.is_set():
            raise EnvironmentBuildError(f"{what} timed out after {self.build_timeout:g} s")
        if code != 0:
            last_error = last_error or last_line
            raise EnvironmentBuildError(
                f"{what} failed with exit code {code}" + (f": {last_error}" if last_error else "")
            )

    @staticmethod
    def _layer_over(python: str, venv: Path) -> None:
        """Let the venv see the mirror's packages after its own (a ``.pth`` in its site dir)."""
        out = subprocess.run(
            [python, "-c", _SITE_DIRS], capture_output=True, check=True, env=_clean_env()
        )
        mirror_sites = json.loads(out.stdout)
        site_dir = next((venv / "lib").glob("python*/site-packages"))
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in mirror_sites)
        (site_dir / "_anylearn_mirror.pth").write_text(lines)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _BUILD_ENV}


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
