"""Executors run prepared tasks: :class:`~.base.Executor` is the interface, `local` the default."""
