"""The mechanism: namespaces, mounts, cgroups and the processes of a sandbox.

Nothing here imports pytest or filelock: the builder process (``builder.py``) runs it under
``python -I -S``. Layers, bottom up: ``_linux`` (syscalls) → ``wire``, ``cgroups``, ``mounts``,
``subids`` → ``config`` (what a sandbox is built from, what P learns) → ``steps`` (the process
steps both forms share) → ``forked`` and ``prebuilt`` (one module per form of the process model),
``builder`` (the builder process) → ``supervise`` (P's one loop, given how the test is started).
"""
