"""Executors run a prepared task: :class:`~.base.Executor` is the interface, ``local`` the default."""
