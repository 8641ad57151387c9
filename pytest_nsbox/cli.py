"""The ``nsbox`` command (also ``python -m pytest_nsbox``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__, images, mounts, probe, sandbox


def cmd_doctor(_args: argparse.Namespace) -> int:
    """Probe what this host supports; exit 1 if sandboxes cannot be built."""
    results = probe.all_probes()
    for result in results:
        print(("ok    " if result.ok else "FAIL  ") + result.describe())
    print(f"uid {os.getuid()}, kernel {os.uname().release}, python {sys.version.split()[0]}")
    return 0 if all(r.ok for r in results) else 1


def cmd_shell(args: argparse.Namespace) -> int:
    """Run a command (default: $SHELL) in a sandbox of IMAGE; changes are thrown away."""
    image = images.resolve(args.image, Path.cwd())
    command = args.command or [os.environ.get("SHELL", "/bin/sh")]
    scratch = tempfile.mkdtemp(prefix=f"pytest-nsbox-{os.getpid()}-")
    try:
        plan = mounts.build_plan(
            image=image,
            network=args.network,
            scratch=scratch,
            host_paths=[],
            mounts=mounts.MountTable.read(),
            host_resolv_conf=open("/etc/resolv.conf").read() if os.path.exists("/etc/resolv.conf") else "",
        )
        config = sandbox.SandboxConfig(
            plan, args.network, os.getuid(), os.getgid(), sandbox.namespace_ids(), "/", sandbox.read_cap_last_cap()
        )

        def target(_channel: sandbox.Channel) -> None:
            os.execvp(command[0], command)

        result = sandbox.run(config, target)
    finally:
        os.rmdir(scratch)
    error = result.setup_error
    if error:
        print(f"nsbox: {error['step']} failed: {error['message']}", file=sys.stderr)
        hint = probe.hint_for(str(error["step"]), error.get("errno"))
        if hint:
            print(f"Hint: {hint}", file=sys.stderr)
        return 125
    if result.test_status is None:
        return 125
    return os.waitstatus_to_exitcode(result.test_status) & 0xFF


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsbox", description="pytest-nsbox: sandboxed tests")
    parser.add_argument("--version", action="version", version=f"pytest-nsbox {__version__}")
    sub = parser.add_subparsers(dest="command_name", required=True)
    doctor = sub.add_parser("doctor", help=cmd_doctor.__doc__)
    doctor.set_defaults(func=cmd_doctor)
    shell = sub.add_parser("shell", help=cmd_shell.__doc__)
    shell.add_argument("image", help="'host' or a rootfs directory")
    shell.add_argument("--network", choices=("none", "host"), default="none")
    shell.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: $SHELL)")
    shell.set_defaults(func=cmd_shell)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (images.ImageError, OSError) as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
