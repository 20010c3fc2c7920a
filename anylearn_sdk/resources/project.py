"""Projects group a user's algorithms, datasets and tasks; each user has a default one."""

from __future__ import annotations

from dataclasses import dataclass

from anylearn_sdk.errors import InvalidArgumentError, NotFoundError
from anylearn_sdk.session import SdkContext


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    is_default: bool = False

    @classmethod
    def from_json(cls, data: dict) -> Project:
        return cls(data["id"], data["name"], data.get("is_default", False))


def find_project(
    ctx: SdkContext, project_id: str | None, project_name: str | None
) -> tuple[Project | None, str | None]:
    """Look a project up without creating anything.

    Returns:
        ``(project, None)`` when it exists, or ``(None, name)`` when ``project_name`` names a
        project still to be created by :func:`ensure_project`.

    Raises:
        InvalidArgumentError: ``project_id`` does not exist.
    """
    if project_id is not None:
        try:
            return Project.from_json(ctx.api.get_json(f"/projects/{project_id}")), None
        except NotFoundError as err:
            raise InvalidArgumentError(f"project_id {project_id!r} not found") from err
    if project_name is not None:
        found = ctx.api.get_json("/projects", params={"name": project_name})
        return (Project.from_json(found[0]), None) if found else (None, project_name)
    default = [p for p in ctx.api.get_json("/projects") if p["is_default"]]
    return Project.from_json(default[0]), None


def ensure_project(ctx: SdkContext, found: Project | None, name: str | None) -> Project:
    if found is not None:
        return found
    return Project.from_json(ctx.api.post_json("/projects", {"name": name}))
