"""The backend's web page (see :mod:`anylearn_sdk.server.web.pages`)."""

from anylearn_sdk.server.web.pages import SecurityHeaders, mount

__all__ = ["SecurityHeaders", "mount"]
