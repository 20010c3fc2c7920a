"""Algorithm sync: pin the code to an exact commit and push only that commit.

Nothing here changes the user's branch, index, HEAD or ``.git/config``:

* a clean repository is pinned to ``HEAD`` (or to ``algorithm_git_ref``);
* a dirty one raises :class:`RequiredLocalCommitError` naming the changed files, unless
  forced: then the working tree (tracked files and untracked files that are not ignored) is
  written with a *temporary* index into a snapshot commit whose parent is HEAD. Its author,
  committer and dates are fixed, so the same tree snapshotted twice is the same commit and is
  not pushed again;
* a folder that is not a git repository is snapshotted the same way through a scratch git
  directory under ``ANYLEARN_HOME/snapshots``, never creating ``.git`` in the folder.

What counts as part of the code follows git: ``.gitignore`` files, plus an ``.anylearnignore``
at the folder's root and the default excludes (``__pycache__/``, ``*.pyc``, ``.venv/``,
``.DS_Store``), handed to git as its ``core.excludesFile`` (after the user's own global
excludes) for this process only. Like ``.gitignore``, they leave out untracked files (which
then do not make the tree dirty either); a file committed at HEAD stays part of HEAD.

The push sends ``<sha>:refs/anylearn/commits/<sha>`` with the token in an
``http.extraHeader`` passed through ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n`` environment
variables (git-config(1), "ENVIRONMENT"), so it is in no URL, argv or config file. A push
that stalls (under ``http.lowSpeedLimit`` bytes/s for ``http.lowSpeedTime`` seconds) or runs
past ``PUSH_TIMEOUT_SECONDS`` is ended.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import git
from git.exc import BadName, GitCommandError, InvalidGitRepositoryError, NoSuchPathError

from anylearn_sdk.content.ignore import IGNORE_FILE
from anylearn_sdk.errors import GitSyncError, InvalidArgumentError, RequiredLocalCommitError
from anylearn_sdk.protocol import SNAPSHOT_EMAIL, SNAPSHOT_MESSAGE_PREFIX

SNAPSHOT_IDENTITY = {
    "GIT_AUTHOR_NAME": "anylearn",
    "GIT_AUTHOR_EMAIL": SNAPSHOT_EMAIL,
    "GIT_COMMITTER_NAME": "anylearn",
    "GIT_COMMITTER_EMAIL": SNAPSHOT_EMAIL,
}
#: Date of snapshots of folders that are not git repositories (deterministic commits).
EPOCH_DATE = "1970-01-01T00:00:00+0000"
#: Left out of every snapshot unless ``.anylearnignore`` re-includes them (``!pattern``).
PLAIN_FOLDER_EXCLUDES = ("__pycache__/", "*.pyc", ".venv/", ".anylearn/", ".DS_Store")
MAX_LISTED_FILES = 10
#: Seconds a whole ``git push`` may take before it is killed.
PUSH_TIMEOUT_SECONDS = 3600
#: A push slower than this many bytes per second for ``PUSH_LOW_SPEED_SECONDS`` is stalled.
PUSH_LOW_SPEED_BYTES = 1000
PUSH_LOW_SPEED_SECONDS = 60


@dataclass(frozen=True)
class Snapshot:
    """The exact commit to run.

    Attributes:
        commit: full hex sha.
        git_dir: the git directory that holds the commit (the user's or a scratch one).
        snapshot: True if the commit was made from the working tree rather than an existing ref.
    """

    commit: str
    git_dir: Path = field(repr=False)
    snapshot: bool


def _open_repo(folder: Path) -> git.Repo | None:
    """The repository whose work tree is exactly ``folder``, or None."""
    try:
        repo = git.Repo(folder)
    except (InvalidGitRepositoryError, NoSuchPathError):
        return None
    if repo.bare or repo.working_tree_dir is None:
        return None
    if Path(repo.working_tree_dir).resolve() != folder.resolve():
        return None
    return repo


def changed_files(repo: git.Repo) -> list[str]:
    """Paths ``git status`` reports as modified, staged, deleted or untracked (not ignored)."""
    out = repo.git.status("--porcelain=v1", "-z", "--untracked-files=all")
    paths = []
    records = out.split("\0")
    i = 0
    while i < len(records):
        record = records[i]
        if record:
            paths.append(record[3:])
            if record[0] in "RC":
                i += 1  # a rename's second record is its old path
        i += 1
    return paths


def _write_tree(
    repo: git.Repo,
    *,
    git_dir: Path | None,
    work_tree: Path,
    seed_index: Path | None,
    base: str | None,
) -> str:
    """Stage the whole work tree into a temporary index and return the tree's sha."""
    with tempfile.TemporaryDirectory(prefix="anylearn-index-") as tmp:
        index = Path(tmp) / "index"
        if seed_index is not None and seed_index.exists():
            shutil.copyfile(
                seed_index, index
            )  # reuse git's stat cache: unchanged files not re-read
        env = {"GIT_INDEX_FILE": str(index), "GIT_WORK_TREE": str(work_tree)}
        if git_dir is not None:
            env["GIT_DIR"] = str(git_dir)
        with repo.git.custom_environment(**env):
            if seed_index is None or not index.exists():
                if base:
                    repo.git.read_tree(base)
                else:
                    repo.git.read_tree("--empty")
            repo.git.add("--all")
            return repo.git.write_tree()


def _commit_tree(repo: git.Repo, tree: str, parent: str | None, date: str, message: str) -> str:
    env = dict(SNAPSHOT_IDENTITY, GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
    args = [tree] + (["-p", parent] if parent else []) + ["-m", message]
    with repo.git.custom_environment(**env):
        return repo.git.commit_tree(*args)


def snapshot(
    folder: Path, *, force: bool = False, git_ref: str | None = None, scratch_root: Path
) -> Snapshot:
    """Pin ``folder``'s code to one commit (see the module docstring).

    Args:
        folder: the algorithm folder.
        force: snapshot uncommitted changes instead of refusing them.
        git_ref: use this branch, tag or sha instead of the working tree.
        scratch_root: where scratch git directories for plain folders live.

    Raises:
        InvalidArgumentError: ``folder`` is missing, or ``git_ref`` is unknown or given for a
            folder that is not a git repository.
        RequiredLocalCommitError: the tree is dirty and ``force`` is False.
        GitSyncError: git itself failed.
    """
    if not folder.is_dir():
        raise InvalidArgumentError(
            f"algorithm_dir {str(folder)!r} does not exist or is not a folder"
        )
    repo = _open_repo(folder)
    with tempfile.TemporaryDirectory(prefix="anylearn-excludes-") as tmp:
        env = _excludes_env(folder, Path(tmp))
        return _snapshot(folder, repo, force, git_ref, scratch_root, env)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _excludes_env(folder: Path, tmp: Path) -> dict[str, str]:
    """``GIT_CONFIG_*`` variables pointing ``core.excludesFile`` at a file that joins the user's
    global excludes, the default excludes and the folder's ``.anylearnignore``."""
    try:
        configured = git.Git().config("--global", "--get", "core.excludesFile")
    except GitCommandError:
        configured = ""
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    user_file = Path(configured).expanduser() if configured else xdg / "git" / "ignore"
    # Later patterns win: .anylearnignore can re-include (``!``) what the others exclude.
    parts = [_read_text(user_file), *PLAIN_FOLDER_EXCLUDES, _read_text(folder / IGNORE_FILE)]
    excludes = tmp / "excludes"
    excludes.write_text("\n".join(parts) + "\n", encoding="utf-8")
    n = int(os.environ.get("GIT_CONFIG_COUNT") or 0)  # keep the user's own GIT_CONFIG_* entries
    return {
        "GIT_CONFIG_COUNT": str(n + 1),
        f"GIT_CONFIG_KEY_{n}": "core.excludesFile",
        f"GIT_CONFIG_VALUE_{n}": str(excludes),
    }


def _snapshot(
    folder: Path,
    repo: git.Repo | None,
    force: bool,
    git_ref: str | None,
    scratch_root: Path,
    env: dict[str, str],
) -> Snapshot:
    try:
        if repo is None:
            if git_ref:
                raise InvalidArgumentError(
                    f"algorithm_git_ref {git_ref!r} given but {str(folder)!r} "
                    "is not a git repository"
                )
            return _snapshot_plain_folder(folder, scratch_root, env)
        if git_ref:
            try:
                return Snapshot(repo.commit(git_ref).hexsha, Path(repo.git_dir), snapshot=False)
            except (BadName, ValueError, GitCommandError) as err:
                raise InvalidArgumentError(
                    f"algorithm_git_ref {git_ref!r} is not a branch, tag or commit "
                    f"of {str(folder)!r}"
                ) from err
        head = repo.head.commit.hexsha if repo.head.is_valid() else None
        with repo.git.custom_environment(**env):
            dirty = changed_files(repo)
        if head is not None and not dirty:
            return Snapshot(head, Path(repo.git_dir), snapshot=False)
        if not force:
            shown = ", ".join(dirty[:MAX_LISTED_FILES])
            more = (
                f" and {len(dirty) - MAX_LISTED_FILES} more"
                if len(dirty) > MAX_LISTED_FILES
                else ""
            )
            what = f"uncommitted changes in {shown}{more}" if dirty else "no commit yet"
            raise RequiredLocalCommitError(
                f"algorithm_dir {str(folder)!r} has {what}; commit them or pass "
                "algorithm_force_update=True to snapshot the working tree",
                dirty,
            )
        with repo.git.custom_environment(**env):
            tree = _write_tree(
                repo, git_dir=None, work_tree=folder, seed_index=Path(repo.index.path), base=head
            )
        if head is not None and repo.commit(head).tree.hexsha == tree:
            return Snapshot(head, Path(repo.git_dir), snapshot=False)
        date = repo.commit(head).committed_datetime.isoformat() if head else EPOCH_DATE
        commit = _commit_tree(repo, tree, head, date, SNAPSHOT_MESSAGE_PREFIX + "the working tree")
        return Snapshot(commit, Path(repo.git_dir), snapshot=True)
    except GitCommandError as err:
        raise GitSyncError(f"git failed on {str(folder)!r}: {err.stderr.strip() or err}") from err


def _snapshot_plain_folder(folder: Path, scratch_root: Path, env: dict[str, str]) -> Snapshot:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    git_dir = scratch_root / f"{key}.git"
    if not (git_dir / "HEAD").exists():
        scratch_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        git.Repo.init(git_dir, bare=True)
    # The excludes come from core.excludesFile (see _excludes_env); info/exclude would outrank
    # the folder's .anylearnignore, so it stays empty (older versions wrote defaults there).
    (git_dir / "info").mkdir(exist_ok=True)
    (git_dir / "info" / "exclude").write_text("")
    repo = git.Repo(git_dir)
    with repo.git.custom_environment(**env):
        tree = _write_tree(repo, git_dir=git_dir, work_tree=folder, seed_index=None, base=None)
    commit = _commit_tree(repo, tree, None, EPOCH_DATE, SNAPSHOT_MESSAGE_PREFIX + folder.name)
    return Snapshot(commit, git_dir, snapshot=True)


def push(snap: Snapshot, remote_url: str, token: str) -> None:
    """Push ``snap.commit`` to ``remote_url`` as ``refs/anylearn/commits/<sha>``.

    Raises:
        GitSyncError: the push failed, stalled or timed out (the message is git's, with no
            token in it).
    """
    env = dict(os.environ)
    n = int(env.get("GIT_CONFIG_COUNT") or 0)  # keep the user's own GIT_CONFIG_* entries
    settings = {
        "http.extraHeader": f"Authorization: Bearer {token}",
        "http.lowSpeedLimit": str(PUSH_LOW_SPEED_BYTES),
        "http.lowSpeedTime": str(PUSH_LOW_SPEED_SECONDS),
    }
    for i, (key, value) in enumerate(settings.items(), start=n):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_CONFIG_COUNT=str(n + len(settings)),
        GIT_DIR=str(snap.git_dir),
    )
    cmd = [
        "git",
        "push",
        "--no-verify",
        "--quiet",
        remote_url,
        f"{snap.commit}:refs/anylearn/commits/{snap.commit}",
    ]
    try:
        git.Git().execute(cmd, env=env, kill_after_timeout=PUSH_TIMEOUT_SECONDS)
    except GitCommandError as err:
        message = str(err.stderr or err).replace(token, "***").strip()
        raise GitSyncError(f"git push of {snap.commit[:12]} failed: {message}") from err
