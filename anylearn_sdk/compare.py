"""Experiment records side by side: the rows of ``anylearn tasks compare``.

One row per thing that can differ between runs, in sections (code, data, parameters,
environment, outcome, metrics), each holding one value per task as text. A row ``differs``
when its values are not all equal. Rows that differ between any two runs by nature (the
elapsed time) are ``informational``: shown, never marked. Pure functions over
:class:`~anylearn_sdk.wire.ExperimentRecord`, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from anylearn_sdk.wire import ExperimentRecord, TaskInput

#: Sections, in the order their rows are listed.
SECTIONS = ("code", "data", "parameters", "environment", "outcome", "metrics")
MISSING = "-"


@dataclass(frozen=True)
class CompareRow:
    """One row: its ``section``, its ``name`` and one value per task (``-`` where a task has
    none); ``differs``: the values are not all equal (never for an informational row)."""

    section: str
    name: str
    values: list[str]
    differs: bool
    informational: bool = False

    def as_json(self) -> dict:
        return asdict(self)


def _text(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value, sort_keys=True)


def _input_text(item: TaskInput) -> str:
    return f"{item.checksum or item.id} ({item.file_count} files, {item.total_bytes} bytes)"


def _inputs(record: ExperimentRecord) -> dict[str, str]:
    """Inputs by ``<kind> <name>`` (numbered when a name repeats)."""
    out: dict[str, str] = {}
    for item in record.data.inputs:
        name = f"{item.kind} {item.name or item.id}"
        key, n = name, 2
        while key in out:
            key, n = f"{name} #{n}", n + 1
        out[key] = _input_text(item)
    if record.data.pretrain:
        out["pretrain"] = ",".join(record.data.pretrain)
    return out


def _elapsed(record: ExperimentRecord) -> str:
    run = record.run
    if run.started_at is None or run.finished_at is None:
        return MISSING
    return f"{(run.finished_at - run.started_at).total_seconds():.1f} s"


def _fixed(record: ExperimentRecord) -> list[tuple[str, str, object]]:
    """The rows every record has: (section, name, value)."""
    code, env, run, params = record.code, record.environment, record.run, record.parameters
    return [
        ("code", "algorithm", code.algorithm),
        ("code", "commit", code.commit),
        ("code", "message", code.message),
        ("code", "snapshot", "yes" if code.snapshot else "no"),
        ("code", "changed files", ", ".join(code.changed_files) or MISSING),
        ("parameters", "entrypoint", params.entrypoint),
        ("environment", "mirror", env.mirror or env.mirror_id),
        ("environment", "python", env.python_version),
        ("environment", "environment", env.environment or "none"),
        ("environment", "packages", f"{len(env.packages)} ({_digest(env.packages)})"),
        ("environment", "gpus", ",".join(map(str, env.gpus)) or MISSING),
        ("environment", "processes", f"{env.num_nodes} x {env.nproc_per_node}"),
        ("outcome", "state", run.state.value),
        ("outcome", "exit code", run.exit_code),
        ("outcome", "error", run.error),
        ("outcome", "attempts", run.attempts),
        ("outcome", "quota group", run.quota_group),
        ("outcome", "request", run.request.model_dump()),
    ]


def _digest(items: Sequence[str]) -> str:
    """A short fingerprint of a list, so two package lists compare in one cell."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12] if items else "none"


def _keyed(records: Sequence[ExperimentRecord]) -> list[tuple[str, str, Callable]]:
    """Rows whose names come from the records: inputs, hyperparameters, logged parameters
    and tags, and per metric its last, min and max."""
    rows: list[tuple[str, str, Callable]] = []

    def names(get: Callable[[ExperimentRecord], dict]) -> list[str]:
        seen: dict[str, None] = {}
        for record in records:
            seen.update(dict.fromkeys(get(record)))
        return list(seen)

    for name in names(_inputs):
        rows.append(("data", name, lambda r, n=name: _inputs(r).get(n)))
    for name in names(lambda r: r.parameters.hyperparams):
        rows.append(
            (
                "parameters",
                f"hyperparameter {name}",
                lambda r, n=name: (
                    _text(r.parameters.hyperparams[n]) if n in r.parameters.hyperparams else None
                ),
            )
        )
    for name in names(lambda r: r.parameters.logged):
        rows.append(("parameters", f"logged {name}", lambda r, n=name: r.parameters.logged.get(n)))
    for name in names(lambda r: r.parameters.tags):
        rows.append(("parameters", f"tag {name}", lambda r, n=name: r.parameters.tags.get(n)))
    for name in names(lambda r: r.results.metrics):
        for stat in ("last", "min", "max"):
            rows.append(
                (
                    "metrics",
                    f"{name} ({stat})",
                    lambda r, n=name, s=stat: (
                        getattr(r.results.metrics[n], s) if n in r.results.metrics else None
                    ),
                )
            )
    return rows


def compare(records: Sequence[ExperimentRecord]) -> list[CompareRow]:
    """The rows comparing ``records`` (one value per record, in their order), by section.

    Raises:
        ValueError: fewer than two records.
    """
    if len(records) < 2:
        raise ValueError("compare needs two or more tasks")
    cells: list[tuple[str, str, list[str], bool]] = []
    fixed = [_fixed(r) for r in records]
    for i, (section, name, _) in enumerate(fixed[0]):
        cells.append((section, name, [_text(f[i][2]) for f in fixed], False))
    for section, name, get in _keyed(records):
        cells.append((section, name, [_text(get(r)) for r in records], False))
    cells.append(("outcome", "elapsed", [_elapsed(r) for r in records], True))
    order = {s: i for i, s in enumerate(SECTIONS)}
    cells.sort(key=lambda c: order[c[0]])  # stable: rows keep their order within a section
    return [
        CompareRow(
            section=section,
            name=name,
            values=values,
            differs=not informational and len(set(values)) > 1,
            informational=informational,
        )
        for section, name, values, informational in cells
    ]
