"""anylearn_sdk: send training jobs from a laptop to a cluster, with git-pinned code and
content-addressed data."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
