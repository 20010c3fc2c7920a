"""Quota groups and mirrors, resolved by name."""

from __future__ import annotations

from dataclasses import dataclass

from anylearn_sdk.errors import InvalidArgumentError
from anylearn_sdk.session import SdkContext


@dataclass(frozen=True)
class QuotaGroup:
    """A capacity pool. ``capacity``/``default_request``: cpu (cores), memory_mb (MiB), gpu."""

    id: str
    name: str
    capacity: dict
    default_request: dict

    def check_fits(self, request: dict | None) -> dict:
        """The request a task gets (``request``, or the group's default), if the group could
        ever hold it.

        Raises:
            InvalidArgumentError: a resource is asked for beyond the group's whole capacity,
                so the task would wait forever (the server refuses it the same way).
        """
        wanted = dict(self.default_request if request is None else request)
        over = [k for k, v in wanted.items() if v > self.capacity.get(k, 0)]
        if over:
            shown = ", ".join(f"{k}={wanted[k]} > {self.capacity.get(k, 0)}" for k in over)
            raise InvalidArgumentError(
                f"quota_group_request exceeds quota group {self.name!r} capacity ({shown})"
            )
        return wanted


@dataclass(frozen=True)
class Mirror:
    """A runtime environment: the Python interpreter tasks run with."""

    id: str
    name: str
    python: str


def _by_name(ctx: SdkContext, path: str, what: str, arg: str, name: str) -> dict:
    rows = ctx.api.get_json(path)
    for row in rows:
        if row["name"] == name:
            return row
    available = ", ".join(sorted(r["name"] for r in rows)) or "none"
    raise InvalidArgumentError(f"unknown {what} {arg}={name!r}; available: {available}")


def resolve_quota_group(ctx: SdkContext, name: str) -> QuotaGroup:
    """The quota group called ``name``.

    Raises:
        InvalidArgumentError: no such group; the message lists the available ones.
    """
    row = _by_name(ctx, "/quota-groups", "quota group", "quota_group_name", name)
    return QuotaGroup(row["id"], row["name"], row["capacity"], row["default_request"])


def resolve_mirror(ctx: SdkContext, name: str) -> Mirror:
    """The mirror called ``name``.

    Raises:
        InvalidArgumentError: no such mirror; the message lists the available ones.
    """
    row = _by_name(ctx, "/mirrors", "mirror", "mirror_name", name)
    return Mirror(row["id"], row["name"], row["python"])
