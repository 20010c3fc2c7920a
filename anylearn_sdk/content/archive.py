"""Safe extraction of a user's dataset archive (zip or tar) into a scratch folder.

tar members go through tarfile's ``data`` filter (PEP 706): absolute paths, ``..``, links
pointing out, and device files are refused. zip members are checked the same way by name, and
zip symlinks (Unix mode in ``external_attr``) are refused.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path

from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.protocol import check_relative_path


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into the existing folder ``dest``.

    Raises:
        InvalidArgumentError: not a zip or tar file, or a member is unsafe (named in the message).
    """
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                try:
                    check_relative_path(info.filename.rstrip("/"), what="archive member")
                except ValueError as err:
                    raise InvalidArgumentError(f"dataset_archive {archive.name}: {err}") from err
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise InvalidArgumentError(
                        f"dataset_archive {archive.name}: member {info.filename!r} is a symlink"
                    )
            zf.extractall(dest)  # noqa: S202 - every member was checked above
        return
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as err:
        raise InvalidArgumentError(f"dataset_archive {archive.name}: unsafe member: {err}") from err
    except tarfile.TarError as err:
        raise InvalidArgumentError(
            f"dataset_archive {str(archive)!r} is not a zip or tar file: {err}"
        ) from err
