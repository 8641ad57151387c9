"""The ``nsbox`` command (also ``python -m pytest_nsbox``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__, images, probe
from .box import mounts
from .box.config import EXIT_SETUP_FAILED, SandboxConfig
from .box.supervise import run_once
from .box.wire import Channel
from .errors import NsboxError
from .images import cache, oci, recipes
from .spec import NETWORKS, format_size

IMAGE_HELP = "'host', a recipe name, a rootfs directory, or oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE"
EXIT_USAGE = 2  # what argparse uses for bad arguments; also for errors the user can fix


def cmd_doctor(_args: argparse.Namespace) -> int:
    """Probe what this host supports; exit 1 if sandboxes cannot be built."""
    results = probe.all_probes()
    for result in results:
        print(("ok    " if result.ok else "FAIL  ") + result.describe())
    for result in probe.optional_probes():
        print(("ok    " if result.ok else "WARN  ") + result.describe())
    if probe.prebuild_supported():
        how = "ahead of each test by a builder process; the test " + (
            "forks straight into its sandbox (root)" if os.geteuid() == 0 else "enters it through one more fork (rootless)"
        )
    else:
        how = "when each test starts (setns through a pidfd needs Linux 5.8)"
    print(f"info  sandboxes are built {how}")
    print(f"uid {os.getuid()}, kernel {os.uname().release}, python {sys.version.split()[0]}")
    return 0 if all(r.ok for r in results) else 1


def cmd_shell(args: argparse.Namespace) -> int:
    """Run a command (default: $SHELL) in a sandbox of IMAGE; changes are thrown away."""
    image = images.resolve(args.image, Path.cwd())
    command = args.command or [os.environ.get("SHELL", "/bin/sh")]
    with mounts.scratch_dir() as scratch:
        plan = mounts.build_plan(
            image=image,
            network=args.network,
            scratch=scratch,
            host_paths=[],
            mounts=mounts.MountTable.read(),
            stacks_dir=str(cache.stacks_dir(cache.default_cache_dir())),
        )

        def target(_channel: Channel) -> None:
            os.execvp(command[0], command)

        result = run_once(SandboxConfig.create(plan, args.network, "/"), target)
    error = result.setup_error
    if error:
        print(f"nsbox: {error['step']} failed: {error['message']}", file=sys.stderr)
        hint = probe.hint_for(str(error["step"]), error.get("errno"))
        if hint:
            print(f"Hint: {hint}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    if result.test_status is None:
        return EXIT_SETUP_FAILED
    return os.waitstatus_to_exitcode(result.test_status) & 0xFF


def _cache(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else cache.default_cache_dir()


def cmd_images_list(args: argparse.Namespace) -> int:
    """List imported images: reference, layers, size, last use."""
    cache_dir = _cache(args)
    records = cache.list_images(cache_dir)
    if not records:
        print(f"no images in {cache_dir}")
        return 0
    print(f"{'image':50}  {'layers':>6}  {'size':>10}  last used")
    for record in records:
        digests = record.get("layers") or []
        size = sum(cache.tree_size(cache.layer_dir(cache_dir, d)) for d in digests)
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(record.get("last_used", 0))))
        print(f"{record['name']:50}  {len(digests):>6}  {format_size(size):>10}  {used}")
    return 0


def cmd_images_build(args: argparse.Namespace) -> int:
    """Build a recipe (--image-dir, rootfs_images/NAME/image.toml, or a shipped one) into the cache now."""
    cache_dir = _cache(args)
    dirs = recipes.search_dirs(Path.cwd(), args.image_dir or [])
    recipe = recipes.find(args.name, dirs)
    if recipe is None:
        known = ", ".join(recipes.known_images(dirs)) or "none"
        print(f"nsbox: no recipe {args.name!r} in {', '.join(map(str, dirs))} (known: {known})", file=sys.stderr)
        return EXIT_USAGE
    layers = recipes.RecipeBuilder(cache_dir, dirs).build(recipe)
    print(f"{args.name}: {len(layers)} layers in {cache_dir}")
    return 0


def cmd_images_import(args: argparse.Namespace) -> int:
    """Import an oci:, oci-archive: or docker-archive: image into the cache now."""
    cache_dir = _cache(args)
    dirs = oci.import_image(args.ref, Path.cwd(), cache_dir)
    print(f"{args.ref}: {len(dirs)} layers in {cache_dir}")
    return 0


def cmd_images_inspect(args: argparse.Namespace) -> int:
    """Show an imported image's layers, bottom first."""
    cache_dir = _cache(args)
    for record in cache.list_images(cache_dir):
        if record["name"] == args.ref:
            print(f"image  {record['name']}\nsource {record['source']}")
            for digest in record.get("layers") or []:
                print(f"layer  {digest}  {format_size(cache.tree_size(cache.layer_dir(cache_dir, digest)))}")
            return 0
    print(f"nsbox: no imported image {args.ref!r} in {cache_dir} (see 'nsbox images list')", file=sys.stderr)
    return 1


def cmd_images_prune(args: argparse.Namespace) -> int:
    """Remove layers no remembered image uses (and forget images unused for --older-than days)."""
    older = args.older_than * 86400 if args.older_than is not None else None
    removed = cache.prune(_cache(args), older_than=older)
    print(f"removed {len(removed)} layer(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsbox", description="pytest-nsbox: sandboxed tests")
    parser.add_argument("--version", action="version", version=f"pytest-nsbox {__version__}")
    sub = parser.add_subparsers(dest="command_name", required=True)
    doctor = sub.add_parser("doctor", help=cmd_doctor.__doc__)
    doctor.set_defaults(func=cmd_doctor)
    shell = sub.add_parser("shell", help=cmd_shell.__doc__)
    shell.add_argument("image", help=IMAGE_HELP)
    shell.add_argument("--network", choices=NETWORKS, default="none")
    shell.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: $SHELL)")
    shell.set_defaults(func=cmd_shell)
    images = sub.add_parser("images", help="imported images and their layer cache")
    images.add_argument("--cache-dir", default="", help="the layer cache (default $XDG_CACHE_HOME/pytest-nsbox)")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    images_sub.add_parser("list", help=cmd_images_list.__doc__).set_defaults(func=cmd_images_list)
    for name, func in (("import", cmd_images_import), ("inspect", cmd_images_inspect)):
        command = images_sub.add_parser(name, help=func.__doc__)
        command.add_argument("ref", help="oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE")
        command.set_defaults(func=func)
    build = images_sub.add_parser("build", help=cmd_images_build.__doc__)
    build.add_argument("name", help="a recipe name")
    build.add_argument("--image-dir", action="append", help="another folder of recipes (repeatable)")
    build.set_defaults(func=cmd_images_build)
    prune = images_sub.add_parser("prune", help=cmd_images_prune.__doc__)
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="also forget images unused for DAYS days")
    prune.set_defaults(func=cmd_images_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (NsboxError, OSError) as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
