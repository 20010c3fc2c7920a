"""Which files of a dataset or algorithm folder are uploaded.

Rules, from strongest to weakest:

1. ``.anylearnignore`` at the folder's root, in ``.gitignore`` syntax. It wins over everything
   else, so ``!*.bin`` re-includes data that the project's ``.gitignore`` keeps out of git.
2. ``.gitignore`` files at any depth, with git's semantics (a deeper file overrides a higher
   one; within a file the last matching pattern wins; a file inside an ignored folder cannot
   be re-included). This follows Ray's ``working_dir`` and SkyPilot's workdir sync.
3. The default excludes: ``.git``, ``__pycache__``, ``.venv``, ``.DS_Store`` and ``*.pyc``,
   wherever they are.

Patterns are compiled by ``pathspec`` (the library black, pre-commit and hatch use for
gitignore matching).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pathspec

from anylearn_sdk.errors import InvalidArgumentError

IGNORE_FILE = ".anylearnignore"
GITIGNORE_FILE = ".gitignore"
#: Names never uploaded, wherever they appear.
DEFAULT_EXCLUDES = frozenset({".git", "__pycache__", ".venv", ".DS_Store"})
DEFAULT_EXCLUDE_SUFFIXES = (".pyc",)


def _read_spec(path: str) -> pathspec.GitIgnoreSpec | None:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgumentError(f"cannot read ignore file {path!r}: {err}") from err
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    return spec if spec.patterns else None


@dataclass
class IgnoreRules:
    """The ignore rules of one folder tree; ask :meth:`ignored` while walking it top-down.

    Attributes:
        root_spec: the compiled ``.anylearnignore``, if any.
        specs: folder (relative, ``""`` for the root, else ending in ``/``) → its compiled
            ``.gitignore``, filled in by :meth:`enter` as the walk reaches each folder.
    """

    root: str
    root_spec: pathspec.GitIgnoreSpec | None = None
    specs: dict[str, pathspec.GitIgnoreSpec] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str) -> IgnoreRules:
        return cls(root, _read_spec(os.path.join(root, IGNORE_FILE)))

    @property
    def trivial(self) -> bool:
        """True when only the default excludes apply (the walk can skip pattern matching)."""
        return self.root_spec is None and not self.specs

    def enter(self, reldir: str) -> None:
        """Read the ``.gitignore`` of ``reldir`` (``""`` or ending in ``/``) on entering it."""
        spec = _read_spec(os.path.join(self.root, reldir, GITIGNORE_FILE))
        if spec is not None:
            self.specs[reldir] = spec

    def ignored(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` (relative, ``/``-separated) is left out."""
        name = relpath.rsplit("/", 1)[-1]
        if name in DEFAULT_EXCLUDES or (not is_dir and name.endswith(DEFAULT_EXCLUDE_SUFFIXES)):
            return True
        if self.trivial:
            return False
        probe = relpath + "/" if is_dir else relpath
        if self.root_spec is not None:
            result = self.root_spec.check_file(probe)
            if result.include is not None:
                return result.include
        parts = relpath.split("/")
        for depth in range(len(parts) - 1, -1, -1):
            base = "/".join(parts[:depth]) + "/" if depth else ""
            spec = self.specs.get(base)
            if spec is None:
                continue
            result = spec.check_file(probe[len(base) :])
            if result.include is not None:
                return result.include
        return False
