"""Bare git repositories, one per algorithm, served over git smart HTTP.

The smart HTTP protocol is delegated to ``git http-backend`` (git's own CGI program, see
git-http-backend(1)); the API layer authenticates the bearer token and checks ownership before
any byte reaches it, and passes the authenticated user as ``REMOTE_USER`` so receive-pack is on.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from anylearn_sdk.protocol import SHA256_HEX, SNAPSHOT_EMAIL, SNAPSHOT_MESSAGE_PREFIX

GIT_TIMEOUT_SECONDS = 600
_SHA1_HEX_LEN = 40


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"})
    return env


def _git(*args: str, git_dir: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    cmd = ["git"]
    if git_dir is not None:
        cmd += ["--git-dir", str(git_dir)]
    env = _git_env()
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        cmd + list(args), capture_output=True, timeout=GIT_TIMEOUT_SECONDS, env=env, **kwargs
    )


def is_commit_sha(sha: str) -> bool:
    """True for a full 40-hex SHA-1 or 64-hex SHA-256 object name."""
    return (len(sha) == _SHA1_HEX_LEN and all(c in "0123456789abcdef" for c in sha)) or bool(
        SHA256_HEX.fullmatch(sha)
    )


def init_bare(path: Path) -> None:
    """Create a bare repository that accepts pushes of any ref under ``refs/``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result = _git("init", "--bare", "--quiet", str(path))
    if result.returncode != 0:
        raise RuntimeError(f"git init failed: {result.stderr.decode(errors='replace').strip()}")
    for key, value in (("http.receivepack", "true"), ("receive.fsckObjects", "true")):
        _git("config", key, value, git_dir=path, check=True)


def has_commit(repo: Path, sha: str) -> bool:
    """True if ``sha`` names a commit present in ``repo``."""
    if not is_commit_sha(sha):
        return False
    return _git("cat-file", "-e", f"{sha}^{{commit}}", git_dir=repo).returncode == 0


def checkout(repo: Path, sha: str, dest: Path) -> None:
    """Write the tree of commit ``sha`` into ``dest`` (no ``.git`` in it), keeping file modes."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), "GIT_WORK_TREE": str(dest)}
        for args in (("read-tree", sha), ("checkout-index", "--all", "--force")):
            result = _git(*args, git_dir=repo, env=env, cwd=dest)
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip()
                raise RuntimeError(f"git {args[0]} of {sha} failed: {message}")


@dataclass(frozen=True)
class CommitInfo:
    """What the experiment record says of a commit: its message, its parents, and whether
    the SDK made it as a snapshot (see :data:`~anylearn_sdk.protocol.SNAPSHOT_EMAIL`)."""

    message: str
    parents: list[str]
    snapshot: bool


def commit_info(repo: Path, sha: str) -> CommitInfo | None:
    """The message, parents and snapshot flag of commit ``sha``; None if it is not there."""
    if not is_commit_sha(sha):
        return None
    result = _git("log", "-1", "--format=%ae%x00%P%x00%B", sha, "--", git_dir=repo)
    if result.returncode != 0:
        return None
    email, parents, message = result.stdout.decode(errors="replace").split("\0", 2)
    message = message.strip()
    snapshot = email == SNAPSHOT_EMAIL and message.startswith(SNAPSHOT_MESSAGE_PREFIX)
    return CommitInfo(message, parents.split(), snapshot)


def changed_paths(repo: Path, base: str, sha: str) -> list[str]:
    """The paths whose content or mode differs between commits ``base`` and ``sha``."""
    result = _git("diff-tree", "-r", "-z", "--name-only", "--no-renames", base, sha, git_dir=repo)
    if result.returncode != 0:
        return []
    return [p for p in result.stdout.decode(errors="replace").split("\0") if p]


def read_file(repo: Path, sha: str, path: str) -> bytes | None:
    """The content of ``path`` in commit ``sha``, or None if it has no such file."""
    if not is_commit_sha(sha):
        return None
    result = _git("cat-file", "blob", f"{sha}:{path}", git_dir=repo)
    return result.stdout if result.returncode == 0 else None


@dataclass
class CGIResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def http_backend(
    repos_root: Path,
    path_info: str,
    *,
    method: str,
    query_string: str,
    content_type: str | None,
    content_encoding: str | None,
    git_protocol: str | None,
    remote_user: str,
    body: bytes,
) -> CGIResponse:
    """Run one smart-HTTP request through ``git http-backend`` and parse its CGI answer."""
    env = {
        "GIT_PROJECT_ROOT": str(repos_root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path_info,
        "REQUEST_METHOD": method,
        "QUERY_STRING": query_string,
        "REMOTE_USER": remote_user,
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)),
        "GIT_HTTP_MAX_REQUEST_BUFFER": "100M",
    }
    if content_type:
        env["CONTENT_TYPE"] = content_type
    if content_encoding:
        env["HTTP_CONTENT_ENCODING"] = content_encoding
    if git_protocol:
        env["GIT_PROTOCOL"] = git_protocol
    result = _git("http-backend", input=body, env=env)
    raw = result.stdout
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, rest = raw.partition(b"\n\n")
    status = 200
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers.append((name.strip(), value.strip()))
    if result.returncode != 0 and status == 200:
        status = 500
    return CGIResponse(status, headers, rest)
