"""Projects group a user's algorithms, datasets and tasks; each user has a default one."""

from __future__ import annotations

from anylearn_sdk.client.http import make_body
from anylearn_sdk.errors import InvalidArgumentError, NotFoundError
from anylearn_sdk.session import SdkContext
from anylearn_sdk.wire import NewProject, ProjectRecord


class Project(ProjectRecord):
    """A project: ``id``, ``name``, ``is_default``, ``created_at``."""


def find_project(
    ctx: SdkContext, project_id: str | None, project_name: str | None
) -> tuple[Project | None, str | None]:
    """Look a project up without creating anything.

    Returns:
        ``(project, None)`` when it exists, or ``(None, name)`` when ``project_name`` names a
        project still to be created by :func:`ensure_project`.

    Raises:
        InvalidArgumentError: ``project_id`` does not exist, or ``project_name`` is not a
            valid name.
    """
    if project_id is not None:
        try:
            return ctx.api.call("GET", f"/projects/{project_id}", Project), None
        except NotFoundError as err:
            raise InvalidArgumentError(f"project_id {project_id!r} not found") from err
    if project_name is not None:
        make_body(NewProject, name=project_name)  # a bad name fails now, before any upload
        found = ctx.api.call("GET", "/projects", list[Project], params={"name": project_name})
        return (found[0], None) if found else (None, project_name)
    default = [p for p in ctx.api.call("GET", "/projects", list[Project]) if p.is_default]
    return default[0], None


def ensure_project(ctx: SdkContext, found: Project | None, name: str | None) -> Project:
    if found is not None:
        return found
    return ctx.api.call("POST", "/projects", Project, make_body(NewProject, name=name))
