"""pytest-nsbox: run a test in fresh Linux namespaces over a throwaway overlay of a root filesystem."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import NsboxError

if TYPE_CHECKING:
    from .spec import Network, SandboxSpec, nsbox

__version__ = "0.1.0"
__all__ = ["Network", "NsboxError", "SandboxSpec", "__version__", "nsbox", "require_sandbox"]


def __getattr__(name: str) -> Any:
    # Lazy: the sandbox builder imports this package's mechanism modules without pytest.
    if name in ("Network", "SandboxSpec", "nsbox"):
        from . import spec

        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_sandbox() -> None:
    """Raise RuntimeError unless the caller runs inside an nsbox sandbox (for destructive tests).

    Checks what a sandbox built by pytest-nsbox always has: the hostname, the root mount's
    source, and PID 1 being the sandbox's init rather than the host's.
    """
    import socket

    from .box.mounts import HOSTNAME, ROOT_SOURCE
    from .box.steps import root_mount_source

    problems = []
    if socket.gethostname() != HOSTNAME:
        problems.append(f"hostname is {socket.gethostname()!r}")
    try:
        with open("/proc/self/mountinfo") as handle:
            source = root_mount_source(handle.read())
    except OSError as exc:
        source = f"unreadable ({exc})"
    if source != ROOT_SOURCE:
        problems.append(f"root filesystem is {source!r}")
    if problems:
        raise RuntimeError("not inside an nsbox sandbox: " + "; ".join(problems))
