"""Quota groups and mirrors: listed to every user, resolved by name, managed by admins."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anylearn_sdk.client.http import make_body
from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.session import SdkContext, get_context
from anylearn_sdk.wire import (
    RESOURCE_KEYS,
    Amounts,
    MirrorRecord,
    MirrorUpdate,
    NewMirror,
    NewQuotaGroup,
    QuotaGroupRecord,
    QuotaGroupUpdate,
)


class QuotaGroup(QuotaGroupRecord):
    """A capacity pool (``capacity`` and ``default_request`` in cores, MiB and GPUs), and what
    its tasks hold now (``allocated``, ``running``, ``queued``)."""

    def check_fits(self, request: dict | None, num_nodes: int = 1) -> dict:
        """The request a task gets (``request`` per node, or the group's default), if the
        group could ever hold ``num_nodes`` times it.

        Raises:
            InvalidArgumentError: a resource is asked for beyond the group's whole capacity,
                so the task would wait forever (the server refuses it the same way).
        """
        wanted = dict(self.default_request.model_dump() if request is None else request)
        total = {k: v * num_nodes for k, v in wanted.items()}
        capacity = self.capacity.model_dump()
        over = [k for k, v in total.items() if v > capacity.get(k, 0)]
        if over:
            shown = ", ".join(f"{k}={total[k]:g} > {capacity.get(k, 0):g}" for k in over)
            nodes = f" on {num_nodes} nodes" if num_nodes > 1 else ""
            raise InvalidArgumentError(
                f"quota_group_request{nodes} exceeds quota group {self.name!r} capacity ({shown})"
            )
        return wanted


class Mirror(MirrorRecord):
    """A runtime environment: the Python interpreter tasks run with."""


def list_quota_groups(*, context: SdkContext | None = None) -> list[QuotaGroup]:
    """Every quota group, oldest first, with its capacity and what its tasks hold now."""
    ctx = context or get_context()
    return ctx.api.call("GET", "/quota-groups", list[QuotaGroup])


def list_mirrors(*, context: SdkContext | None = None) -> list[Mirror]:
    """Every mirror (name and the interpreter on the server), oldest first."""
    ctx = context or get_context()
    return ctx.api.call("GET", "/mirrors", list[Mirror])


def _by_name(rows: list, what: str, arg: str, name: str):
    for row in rows:
        if row.name == name:
            return row
    available = ", ".join(sorted(r.name for r in rows)) or "none"
    raise InvalidArgumentError(f"unknown {what} {arg}={name!r}; available: {available}")


def resolve_quota_group(ctx: SdkContext, name: str) -> QuotaGroup:
    """The quota group called ``name``.

    Raises:
        InvalidArgumentError: no such group; the message lists the available ones.
    """
    return _by_name(list_quota_groups(context=ctx), "quota group", "quota_group_name", name)


def resolve_mirror(ctx: SdkContext, name: str) -> Mirror:
    """The mirror called ``name``.

    Raises:
        InvalidArgumentError: no such mirror; the message lists the available ones.
    """
    return _by_name(list_mirrors(context=ctx), "mirror", "mirror_name", name)


def check_amounts(arg: str, values: Mapping[str, Any] | None) -> Amounts | None:
    """``values`` (``{"cpu", "memory_mb", "gpu"}``, missing keys 0) as :class:`Amounts`, or
    None when ``values`` is None.

    Raises:
        InvalidArgumentError: not a mapping, an unknown key, a negative amount, a fractional
            GPU or MiB.
    """
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise InvalidArgumentError(f"{arg} must be a dict such as {{'cpu': 2}}, got {values!r}")
    unknown = sorted(set(values) - set(RESOURCE_KEYS))
    if unknown:
        raise InvalidArgumentError(
            f"{arg} has unknown keys {unknown}; allowed: {list(RESOURCE_KEYS)}"
        )
    for key, value in values.items():
        whole = key != "cpu"
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < 0
            or (whole and value != int(value))
        ):
            kind = "a whole number >= 0" if whole else "a number >= 0"
            raise InvalidArgumentError(f"{arg}[{key!r}] = {value!r} must be {kind}")
    return Amounts(**values)


def add_quota_group(
    name: str,
    capacity: dict,
    default_request: dict | None = None,
    *,
    context: SdkContext | None = None,
) -> QuotaGroup:
    """Add a quota group (admin only).

    Args:
        name: letters, digits, ``.``, ``_``, ``-``.
        capacity: ``{"cpu": cores, "memory_mb": MiB, "gpu": count}``; missing keys are 0.
        default_request: what a task that asks for nothing gets (default: one core).

    Raises:
        InvalidArgumentError: an unknown key or a negative amount.
        ConflictError: a group of that name exists.
        PermissionDeniedError: the caller is not an admin.
    """
    body = make_body(
        NewQuotaGroup,
        name=name,
        capacity=check_amounts("capacity", capacity),
        default_request=check_amounts("default_request", default_request) or Amounts(cpu=1),
    )
    ctx = context or get_context()
    return ctx.api.call("POST", "/quota-groups", QuotaGroup, body)


def set_quota_group(
    name: str,
    *,
    capacity: dict | None = None,
    default_request: dict | None = None,
    context: SdkContext | None = None,
) -> QuotaGroup:
    """Change a quota group's capacity or default request (admin only); what is not given
    stays. Running tasks keep what they hold.

    Raises:
        InvalidArgumentError: an unknown key or a negative amount.
        NotFoundError: no such group.
    """
    body = QuotaGroupUpdate(
        capacity=check_amounts("capacity", capacity),
        default_request=check_amounts("default_request", default_request),
    )
    ctx = context or get_context()
    return ctx.api.call("PATCH", f"/quota-groups/{name}", QuotaGroup, body, resource_id=name)


def remove_quota_group(name: str, *, context: SdkContext | None = None) -> None:
    """Remove a quota group (admin only).

    Raises:
        ConflictError: tasks are queued or running in it, or it is the default group.
        NotFoundError: no such group.
    """
    ctx = context or get_context()
    ctx.api.request("DELETE", f"/quota-groups/{name}", resource_id=name)


def add_mirror(name: str, python: str, *, context: SdkContext | None = None) -> Mirror:
    """Add a mirror naming an interpreter on the server machine (admin only).

    Raises:
        BadRequestError: ``python`` is not an absolute path to an interpreter that runs.
        ConflictError: a mirror of that name exists.
    """
    ctx = context or get_context()
    body = make_body(NewMirror, name=name, python=python)
    return ctx.api.call("POST", "/mirrors", Mirror, body)


def set_mirror(name: str, python: str, *, context: SdkContext | None = None) -> Mirror:
    """Point mirror ``name`` at another interpreter on the server machine (admin only);
    attempts that start afterwards use it.

    Raises:
        BadRequestError: ``python`` is not an absolute path to an interpreter that runs.
        NotFoundError: no mirror of that name.
    """
    ctx = context or get_context()
    body = make_body(MirrorUpdate, python=python)
    return ctx.api.call("PATCH", f"/mirrors/{name}", Mirror, body, resource_id=name)
