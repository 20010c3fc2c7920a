"""Datasets and models on their own: upload one, or preview what an upload would send.

``quick_train`` does this for its inputs; these are for data shared by many tasks, scripts
and benchmarks (compare huggingface_hub's ``upload_folder``). Both cost only what changed: an
unchanged folder is recognised from one walk, and only objects the server lacks travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from anylearn_sdk.content.archive import archive_manifest
from anylearn_sdk.content.manifest import Manifest, build_manifest
from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.interrupts import INTERRUPTED_MESSAGE, stoppable_pool
from anylearn_sdk.progress import ProgressCallback, resolve_progress
from anylearn_sdk.resources.algorithm import algorithm_name_for
from anylearn_sdk.resources.dataset import (
    Dataset,
    Model,
    await_ready,
    known_resource,
    last_known,
    start_sync,
)
from anylearn_sdk.resources.project import ensure_project, find_project
from anylearn_sdk.resources.upload import (
    build_and_preupload,
    plan_units,
    preuploads_for,
    upload_streams,
)
from anylearn_sdk.session import get_context
from anylearn_sdk.states import ResourceState
from anylearn_sdk.wire import DigestList, MissingObjects


def _manifest_of(folder: Path | None, archive: Path | None, report: ProgressCallback):
    ctx = get_context()
    if archive is not None:
        return archive_manifest(archive, ctx.store, report, archive.name)
    if folder is None:
        raise InvalidArgumentError("give dataset_dir or dataset_archive")
    return build_manifest(folder, ctx.store, report, label=folder.name)


def _source(
    arg: str, folder: str | Path | None, archive: str | Path | None
) -> tuple[Path | None, Path | None, str]:
    if (folder is None) == (archive is None):
        raise InvalidArgumentError(f"give exactly one of {arg} and dataset_archive")
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"dataset_archive {str(archive)!r} is not a file")
        return None, path, algorithm_name_for(path.name.split(".")[0])
    path = Path(folder).expanduser()  # type: ignore[arg-type]
    if not path.is_dir():
        raise InvalidArgumentError(f"{arg} {str(folder)!r} does not exist or is not a folder")
    return path, None, algorithm_name_for(path.resolve().name)


def _sync(
    kind: str,
    folder: Path | None,
    archive: Path | None,
    name: str,
    project_name: str | None,
    progress: bool | ProgressCallback | None,
    resource_polling: float,
    resource_timeout: float,
) -> Dataset:
    report = resolve_progress(progress)
    ctx = get_context()

    def project_id() -> str | None:
        if project_name is None:
            return None  # the server files it under the user's default project
        return ensure_project(ctx, *find_project(ctx, None, project_name)).id

    try:
        with stoppable_pool(1, "anylearn-upload") as (pool, stop):
            source = archive if archive is not None else folder
            guess = pool.submit(last_known, ctx, kind, str(source.resolve())) if source else None
            # A folder's small files leave in packs while the rest is hashed; the version is
            # registered while the last ones travel.
            with preuploads_for(ctx, folder, report, name, stop) as early:
                if folder is not None:
                    manifest = build_and_preupload(ctx, folder, report, name, early)
                else:
                    manifest = _manifest_of(folder, archive, report)
                pending = start_sync(
                    ctx, kind, manifest, name, project_id, pool, report, guess, stop, early
                )
                ready = await_ready(
                    ctx,
                    pending,
                    polling=resource_polling,
                    timeout=resource_timeout,
                    progress=report,
                )
            manifest.saved()  # written while the version was registered
            return ready
    except KeyboardInterrupt:
        report.message(INTERRUPTED_MESSAGE)
        raise


def sync_dataset(
    dataset_dir: str | Path | None = None,
    *,
    dataset_archive: str | Path | None = None,
    name: str | None = None,
    project_name: str | None = None,
    progress: bool | ProgressCallback | None = True,
    resource_polling: float = 5.0,
    resource_timeout: float = 3600.0,
) -> Dataset:
    """Make the server hold this folder (or zip/tar archive) as a READY dataset version.

    Args:
        dataset_dir: the folder; or ``dataset_archive``, a zip or tar file (exactly one).
        name: the version's label (default: the folder's or archive's name).
        project_name: the project to file it under (created if needed; default project if None).
        progress: True for bars and messages, False for silence, or a ``ProgressCallback``.
        resource_polling: seconds between readiness polls while the server verifies.
        resource_timeout: seconds to wait for READY.

    Returns:
        The :class:`Dataset`; ``uploaded_bytes`` says what this call sent (0 if nothing changed).

    Raises:
        InvalidArgumentError: a bad folder, archive, or unsafe archive member.
        ResourceError: the server rejected the content (an object failed verification).
        AnylearnTimeoutError: not READY within ``resource_timeout`` seconds.
    """
    folder, archive, default_name = _source("dataset_dir", dataset_dir, dataset_archive)
    return _sync(
        "dataset",
        folder,
        archive,
        name or default_name,
        project_name,
        progress,
        resource_polling,
        resource_timeout,
    )


def sync_model(
    model_dir: str | Path,
    *,
    name: str | None = None,
    project_name: str | None = None,
    progress: bool | ProgressCallback | None = True,
    resource_polling: float = 5.0,
    resource_timeout: float = 3600.0,
) -> Model:
    """:func:`sync_dataset` for a model folder; returns a :class:`Model`."""
    folder, _, default_name = _source("model_dir", model_dir, None)
    model = _sync(
        "model",
        folder,
        None,
        name or default_name,
        project_name,
        progress,
        resource_polling,
        resource_timeout,
    )
    return cast(Model, model)  # class_for("model") builds a Model


@dataclass(frozen=True)
class Preview:
    """What :func:`sync_dataset` would do now.

    Attributes:
        checksum: the manifest checksum.
        file_count, total_bytes: the files kept by the ignore rules, and their bytes.
        biggest: the largest files, ``(path, bytes)``, largest first.
        hashed_bytes: bytes read to build the manifest now (0 when the caches vouched for all).
        known_id: the id of a READY version with this checksum already on the server, if any.
        upload_files, upload_bytes: files the server lacks, and the bytes that would travel
            (packs included).
    """

    root: str
    checksum: str
    file_count: int
    total_bytes: int
    hashed_bytes: int
    known_id: str | None
    upload_files: int
    upload_bytes: int
    biggest: list[tuple[str, int]] = field(default_factory=list)


def preview_dataset(
    dataset_dir: str | Path | None = None,
    *,
    dataset_archive: str | Path | None = None,
    top: int = 10,
    progress: bool | ProgressCallback | None = False,
) -> Preview:
    """Count what is in a dataset and what an upload would send now, creating nothing.

    Raises:
        InvalidArgumentError: a bad folder or archive.
    """
    folder, archive, _ = _source("dataset_dir", dataset_dir, dataset_archive)
    ctx = get_context()
    manifest: Manifest = _manifest_of(folder, archive, resolve_progress(progress))
    known = known_resource(ctx, "dataset", manifest.checksum)
    entries = manifest.entries
    biggest = sorted(((e.path, e.size) for e in entries), key=lambda x: (-x[1], x[0]))[:top]
    ready = known is not None and known.state == ResourceState.READY
    if ready:
        missing: list[str] = []
    else:
        digests = sorted({e.sha256 for e in entries})
        body = DigestList.model_construct(digests=digests)  # our own digests: no revalidation
        missing = ctx.api.call("POST", "/objects/missing", MissingObjects, body).missing
    sizes = {e.sha256: e.size for e in entries}
    units = plan_units(
        "preview", missing, sizes, manifest.sources, upload_streams(), manifest.total_bytes
    )
    lacking = set(missing)
    return Preview(
        root=str(archive or folder),
        checksum=manifest.checksum,
        file_count=manifest.file_count,
        total_bytes=manifest.total_bytes,
        hashed_bytes=manifest.hashed_bytes,
        known_id=known.id if known is not None and ready else None,
        upload_files=sum(1 for e in entries if e.sha256 in lacking),
        upload_bytes=sum(u.body.length for u in units),
        biggest=biggest,
    )
