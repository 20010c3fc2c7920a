"""The reference backend: an HTTP service that stores code, data and tasks and runs training.

Installed with the ``server`` extra. Entry points: :func:`anylearn_sdk.server.app.create_app`
(the ASGI app) and :func:`anylearn_sdk.server.runner.serve` (bind, bootstrap, run).
"""
