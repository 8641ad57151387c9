"""The ``nsbox`` command (also ``python -m pytest_nsbox``)."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

from . import __version__, images, kept, probe
from .box import cgroups, mounts
from .box.config import EXIT_SETUP_FAILED, SandboxConfig, SandboxResult
from .box.supervise import run_once
from .box.wire import Channel
from .errors import NsboxError
from .images import archive, cache, oci, recipes
from .images.config import become, id_mapping_for, run_environment
from .prepare import default_disk_bound
from .project import Project
from .reports import limit_violation
from .spec import NETWORKS, SandboxSpec, SpecError, format_size, parse_field

IMAGE_HELP = "'host', a recipe name, a rootfs directory, or oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE"
EXIT_USAGE = 2  # what argparse uses for bad arguments; also for errors the user can fix


def cmd_doctor(_args: argparse.Namespace) -> int:
    """Probe the setup the plugin would use here (the project's ini, the environment); exit 1 if
    sandboxed tests would be skipped or error with it (see pytest_nsbox.doctor for the rule)."""
    from . import doctor

    found = doctor.diagnose(_project(), os.environ)
    print("\n".join(doctor.render(found)))
    status = doctor.exit_status(found)
    print(f"{'ok' if status == 0 else 'FAIL':<5} {doctor.OK_EXIT if status == 0 else doctor.FAIL_EXIT}")
    return status


def cmd_shell(args: argparse.Namespace) -> int:
    """Run a command (default: $SHELL) in a sandbox of IMAGE; changes are thrown away."""
    if args.kept is not None:
        if args.image is not None:
            args.command = [args.image, *args.command]  # "shell --kept NODEID CMD...": no IMAGE then
            args.image = None
        return _shell_kept(args)
    if args.image is None:
        print("nsbox: shell needs an IMAGE (or --kept NODEID)", file=sys.stderr)
        return EXIT_USAGE
    project = _project()
    cache_dir = project.cache_dir()
    try:
        limits = _shell_limits(args)
    except SpecError as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    hold = cache.InUse(cache_dir) if args.image != images.HOST else None
    try:
        image = images.resolve(args.image, project.rootdir, cache_dir, project.ini_lines("nsbox_image_dirs"))
        cgroup = _shell_cgroup(limits, project)
        try:
            return _shell(args, image, cache_dir, limits, cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.discard()  # the sandbox never started: nothing else releases it
            raise
    finally:
        if hold is not None:
            hold.release()


KEPT_PRIVATE_NETWORK: Final = (
    "nsbox: the test ran on the run's private network, which ended with the run: this shell has network 'none'"
)
SHELL_LIMITS: Final = ("memory", "pids", "cpus", "timeout", "disk")
EXIT_NOT_FOUND: Final = 127  # as a shell says: the command was not found
EXIT_NOT_RUNNABLE: Final = 126  # found, but cannot be run
EXIT_TIMED_OUT: Final = 124  # as timeout(1) says


def _shell_limits(args: argparse.Namespace, network: str | None = None) -> SandboxSpec:
    """The shell's limits from its options, parsed as a marker's are (SpecError names the option)."""
    fields = {name: parse_field(name, getattr(args, name), f"option --{name}") for name in SHELL_LIMITS if getattr(args, name)}
    return replace(SandboxSpec(network=network or args.network or "none"), **fields)  # type: ignore[arg-type]


def _shell_cgroup(limits: SandboxSpec, project: Project) -> cgroups.Cgroup | None:
    """The shell's cgroup, where it asked for memory, pids or cpus; NsboxError if one cannot be
    enforced (never a limit silently dropped)."""
    wanted = cgroups.Limits(memory=limits.memory, pids=limits.pids, cpus=limits.cpus)
    if not wanted.controllers():
        return None
    manager = cgroups.detect(probe.cgroup_root_setting(project.ini(probe.CGROUP_ROOT_INI))[0])
    if manager is None:
        raise NsboxError(f"cannot enforce {', '.join(wanted.controllers())}: no cgroup hierarchy found (see nsbox doctor)")
    available = manager.check(wanted.controllers())
    if not available.ok:
        fix = f". Hint: {available.fix}" if available.fix else ""
        raise NsboxError(f"cannot enforce {', '.join(wanted.controllers())}: {available.reason}{fix}")
    return manager.create(wanted)


def _shell(
    args: argparse.Namespace, image: images.ResolvedImage, cache_dir: Path, limits: SandboxSpec, cgroup: cgroups.Cgroup | None
) -> int:
    """An imported image or a recipe applies its config as ``docker run`` does: the environment
    is the image's Env (plus PATH and HOME if it sets none, and the caller's TERM), the command
    runs in its WorkingDir (created if missing) as its User. "host" and a rootfs directory keep
    the caller's environment, and run in "/" as root. ``-e`` and ``-w`` come on top."""
    command = args.command or [os.environ.get("SHELL", "/bin/sh")]
    user, env, workdir = image.user, None, "/"
    if image.config is not None:
        env = run_environment(image.config, user)
        if "TERM" in os.environ and "TERM" not in env:
            env["TERM"] = os.environ["TERM"]
        workdir = image.config.workdir or "/"
    if args.env:
        env = dict(os.environ if env is None else env)
        for item in args.env:  # KEY=VALUE, or KEY: the caller's value (as docker run -e)
            key, sep, value = item.partition("=")
            if sep:
                env[key] = value
            elif key in os.environ:
                env[key] = os.environ[key]
    workdir = args.workdir or workdir
    mapping = id_mapping_for(user, args.image)
    with mounts.scratch_dir() as scratch:
        plan = mounts.build_plan(
            image=image.root,
            network=args.network or "none",
            scratch=scratch,
            host_paths=[],
            mounts=mounts.MountTable.read(),
            stacks_dir=str(cache.stacks_dir(cache_dir)),
            disk=limits.disk or default_disk_bound(),
        )

        def target(_channel: Channel) -> None:
            os.makedirs(workdir, exist_ok=True)
            os.chdir(workdir)
            if user is not None and not user.is_root:
                become(user)
            _exec(command, env)

        config = SandboxConfig.create(
            plan,
            args.network or "none",
            "/",
            id_mapping=mapping,
            cgroup_files=cgroup.join_files if cgroup is not None else (),
            oom_first=limits.memory is not None,
        )
        result = run_once(config, target, cgroup=cgroup, timeout=limits.timeout)
    return _shell_status(result, limits)


def _shell_status(result: SandboxResult, limits: SandboxSpec) -> int:
    """The shell's exit status; what went wrong on stderr."""
    error = result.setup_error
    if error:
        print(f"nsbox: {error['step']} failed: {error['message']}", file=sys.stderr)
        hint = probe.hint_for(str(error["step"]), error.get("errno"))
        if hint:
            print(f"Hint: {hint}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    for record in result.records:
        if record["kind"] == "internal_error":
            print(f"nsbox: the sandbox failed: {str(record.get('traceback', '')).strip().splitlines()[-1:]}", file=sys.stderr)
    cause = limit_violation(limits, result)
    if cause is not None:
        print(cause.message.replace("nsbox: test ", "nsbox: the command ", 1), file=sys.stderr)
        if result.timed_out:
            return EXIT_TIMED_OUT
    if result.test_status is None:
        return EXIT_SETUP_FAILED
    code = os.waitstatus_to_exitcode(result.test_status)
    return 128 - code if code < 0 else code & 0xFF  # killed by a signal: 128 + its number, as a shell says


def _kept_dir(nodeid: str, run: str | None) -> Path:
    project = _project()
    return kept.find_kept(kept.project_dir(project.cache_dir(), project.rootdir), nodeid, run)


def _shell_kept(args: argparse.Namespace) -> int:
    """nsbox shell --kept NODEID: the kept test's image with its kept layer on top (copy-on-write:
    the kept layer is not changed), its environment, cwd, network and limits (but its timeout)."""
    directory = _kept_dir(args.kept, args.run)
    meta = kept.read_meta(directory)
    image = kept.image_root(meta)
    network = args.network or str(meta.get("network") or "none")
    if network == "private" and not args.network:  # its services and bridge lived in the test run
        print(KEPT_PRIVATE_NETWORK, file=sys.stderr)
        network = "none"
    stored = meta.get("limits")
    stored = stored if isinstance(stored, dict) else {}
    try:
        given = _shell_limits(args, network)
    except SpecError as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    fields = {name: getattr(given, name) for name in SHELL_LIMITS if getattr(args, name)}
    for name in ("memory", "pids", "cpus", "disk"):  # the test's timeout would end an interactive shell: not applied
        if name not in fields and isinstance(stored.get(name), int | float):
            fields[name] = stored[name]
    limits = replace(SandboxSpec(network=network), **fields)  # type: ignore[arg-type]
    env = {str(k): str(v) for k, v in (meta.get("environment") or {}).items()}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    workdir = args.workdir or str(meta.get("cwd") or "/")
    command = args.command or [os.environ.get("SHELL", "/bin/sh")]
    host_paths = [
        mounts.HostPath(str(path), access)
        for path, access in meta.get("host_paths") or []
        if os.path.exists(str(path))  # a basetemp pytest has removed since
    ]
    project = _project()
    cache_dir = project.cache_dir()
    hold = cache.InUse(cache_dir) if image != images.HOST else None
    # in the temporary directory: inside the rootdir or home (lower layers too) overlayfs refuses it (ELOOP)
    layer = Path(tempfile.mkdtemp(prefix="nsbox-kept-"))
    try:
        kept.extract_kept(directory, layer)
        cgroup = _shell_cgroup(limits, project)
        try:
            with mounts.scratch_dir() as scratch:
                plan = mounts.build_plan(
                    image=image,
                    network=network,
                    scratch=scratch,
                    host_paths=host_paths,
                    mounts=mounts.MountTable.read(),
                    stacks_dir=str(cache.stacks_dir(cache_dir)),
                    disk=limits.disk or default_disk_bound(),
                    kept=str(layer),
                )

                def target(_channel: Channel) -> None:
                    try:
                        os.chdir(workdir)
                    except OSError as exc:
                        print(f"nsbox: cannot enter the test's directory {workdir}: {exc.strerror}", file=sys.stderr)
                    _exec(command, env)

                config = SandboxConfig.create(
                    plan,
                    network,
                    "/",
                    cgroup_files=cgroup.join_files if cgroup is not None else (),
                    oom_first=limits.memory is not None,
                )
                result = run_once(config, target, cgroup=cgroup, timeout=limits.timeout)
        except BaseException:
            if cgroup is not None:
                cgroup.discard()
            raise
    finally:
        if hold is not None:
            hold.release()
        cache.remove_tree(layer)
    return _shell_status(result, limits)


def _exec(command: list[str], env: dict[str, str] | None) -> None:
    """In the sandbox: run *command*; what a shell says, and its status, if it cannot be run."""
    try:
        if env is None:
            os.execvp(command[0], command)
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"nsbox: cannot run {command[0]!r} in the sandbox: {exc.strerror}", file=sys.stderr, flush=True)
        os._exit(EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_RUNNABLE)


def cmd_diff(args: argparse.Namespace) -> int:
    """What a kept test changed: one line per path (A added, C changed, D deleted), diffs of small text files."""
    directory = _kept_dir(args.nodeid, args.run)
    meta = kept.read_meta(directory)
    changes = kept.Changes.from_json(meta.get("changes"))
    if args.json:
        data = {"nodeid": meta.get("nodeid"), "outcome": meta.get("outcome"), "kept": str(directory), **changes.to_json()}
        print(json.dumps(data, indent=1))
        return 0
    print(f"{kept.CHANGES_SECTION}: {meta.get('nodeid')} ({meta.get('outcome')}), kept in {directory}")
    print(changes.render(limit=None, diffs=None))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a kept test's writable layer as a tar layer with OCI whiteouts (.wh.NAME, .wh..wh..opq)."""
    directory = _kept_dir(args.nodeid, args.run)
    output = Path(args.output)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(directory / kept.LAYER_FILE, temporary)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    print(f"nsbox: wrote the kept layer of {args.nodeid} to {output}", file=sys.stderr)
    return 0


def _project() -> Project:
    return Project.find(Path.cwd())


def _cache(args: argparse.Namespace, project: Project) -> Path:
    return project.cache_dir(args.cache_dir)


def _recipe_dirs(args: argparse.Namespace, project: Project) -> list[Path]:
    """Recipe folders as the plugin searches them: --image-dir, the ini's nsbox_image_dirs, the
    project's rootfs_images/, the shipped recipes."""
    extra = [str(Path(d).resolve()) for d in getattr(args, "image_dir", None) or []]
    return recipes.search_dirs(project.rootdir, [*extra, *project.ini_lines("nsbox_image_dirs")])


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


def _unique_size(cache_dir: Path, layers: set[str]) -> int:
    return sum(cache.tree_size(cache.layer_dir(cache_dir, layer)) for layer in layers)


def cmd_images_list(args: argparse.Namespace) -> int:
    """List the images in the cache (recipes built, images imported): name, kind, layers, size, created, last use."""
    project = _project()
    cache_dir = _cache(args, project)
    records = cache.list_images(cache_dir)
    built = {r.name for r in records if r.kind == "recipe"}
    not_built = [name for name in recipes.known_images(_recipe_dirs(args, project)) if name not in built]
    if not records:
        print(f"no images in {cache_dir}")
    else:
        width = max(len("IMAGE"), *(len(record.name) for record in records))
        print(f"{'IMAGE':{width}}  {'KIND':14}  {'LAYERS':>6}  {'SIZE':>10}  {'CREATED':16}  LAST USED")
        for record in records:
            size, created, used = format_size(record.size(cache_dir)), _when(record.created), _when(record.last_used)
            print(f"{record.name:{width}}  {record.kind:14}  {len(record.layers):>6}  {size:>10}  {created:16}  {used}")
        layers = {layer for r in records for layer in r.layers}
        unused = [layer for layer in cache.layer_ids(cache_dir) if layer not in layers]
        total = format_size(_unique_size(cache_dir, layers | set(unused)))
        print(f"{len(records)} image(s), {len(layers) + len(unused)} layer(s), {total} in {cache_dir}", end="")
        print(f" ({len(unused)} layer(s) no image uses: nsbox images prune)" if unused else "")
    if not_built:
        print(f"recipes not built yet: {', '.join(not_built)} (nsbox images build NAME)")
    return 0


def _matching(records: list[cache.ImageRecord], name: str, project: Project, dirs: list[Path]) -> list[cache.ImageRecord]:
    """The records *name* means here: this project's recipe of that name, the image that reference
    names from here; else every record of that name."""
    named = [r for r in records if r.name == name]
    source: Path | None = None
    if oci.is_reference(name):
        source = oci.parse_reference(name, project.rootdir)[1]
    else:
        recipe = recipes.find(name, dirs)
        source = recipe.path if recipe is not None else None
    if source is not None:
        exact = [r for r in named if r.source == str(source.resolve())]
        if exact:
            return exact
    return named


def _named(
    records: list[cache.ImageRecord], names: Sequence[str], project: Project, dirs: list[Path]
) -> list[cache.ImageRecord] | str:
    """The records the names mean (see _matching), or the first name that means none."""
    chosen: list[cache.ImageRecord] = []
    for name in names:
        matching = _matching(records, name, project, dirs)
        if not matching:
            return name
        chosen += matching
    return chosen


def _no_image(name: str, cache_dir: Path) -> int:
    print(f"nsbox: no image {name!r} in {cache_dir} (see 'nsbox images list')", file=sys.stderr)
    return 1


def cmd_images_build(args: argparse.Namespace) -> int:
    """Build recipes (--image-dir, ini nsbox_image_dirs, rootfs_images/NAME/image.toml, shipped) into the cache now."""
    project = _project()
    cache_dir = _cache(args, project)
    dirs = _recipe_dirs(args, project)
    found = [(name, recipes.find(name, dirs)) for name in args.names]
    for name, recipe in found:
        if recipe is None:
            known = ", ".join(recipes.known_images(dirs)) or "none"
            print(f"nsbox: no recipe {name!r} in {', '.join(map(str, dirs))} (known: {known})", file=sys.stderr)
            return EXIT_USAGE
    with cache.InUse(cache_dir):
        for name, recipe in found:
            assert recipe is not None
            start = time.monotonic()
            layers = recipes.RecipeBuilder(cache_dir, dirs, output_lines=True).build(recipe)
            print(f"{name}: {len(layers)} layers in {cache_dir} ({time.monotonic() - start:.1f}s)")
    return 0


def cmd_images_key(args: argparse.Namespace) -> int:
    """Print a content key of recipes: it changes exactly when a rebuild would (a CI cache key)."""
    project = _project()
    cache_dir = _cache(args, project)
    dirs = _recipe_dirs(args, project)
    keys = []
    for name in args.names:
        recipe = recipes.find(name, dirs)
        if recipe is None:
            print(f"nsbox: no recipe {name!r} in {', '.join(map(str, dirs))}", file=sys.stderr)
            return EXIT_USAGE
        keys.append(recipes.RecipeBuilder(cache_dir, dirs).content_key(recipe))
    print(keys[0] if len(keys) == 1 else hashlib.sha256("\n".join(keys).encode()).hexdigest())
    return 0


def cmd_images_import(args: argparse.Namespace) -> int:
    """Import an oci:, oci-archive: or docker-archive: image into the cache now."""
    project = _project()
    cache_dir = _cache(args, project)
    with cache.InUse(cache_dir):
        dirs = oci.import_image(args.ref, project.rootdir, cache_dir)
    print(f"{args.ref}: {len(dirs)} layers in {cache_dir}")
    return 0


def cmd_images_inspect(args: argparse.Namespace) -> int:
    """Show an image: source, content key, layers bottom first (what made each, size); a recipe also when not built."""
    project = _project()
    cache_dir = _cache(args, project)
    dirs = _recipe_dirs(args, project)
    matching = _matching(cache.list_images(cache_dir), args.name, project, dirs)
    recipe = None if oci.is_reference(args.name) else recipes.find(args.name, dirs)
    if not matching and recipe is None:
        return _no_image(args.name, cache_dir)
    shown: list[dict[str, object]] = []
    for record in matching:
        layers = [
            {"layer": layer, "created_by": what, "size": cache.tree_size(cache.layer_dir(cache_dir, layer))}
            for layer, what in zip(record.layers, record.history, strict=False)
        ]
        shown.append(
            {"name": record.name, "kind": record.kind, "source": record.source, "key": record.key, "built": True}
            | {"created": _when(record.created), "last_used": _when(record.last_used), "layers": layers}
        )
    if not matching and recipe is not None:
        key = recipes.RecipeBuilder(cache_dir, dirs).content_key(recipe)
        parts = [recipe.base, *(next(iter(step.items())) for step in recipe.steps)]
        steps = [recipes.describe_step(kind, value) for kind, value in parts]
        about = {"name": recipe.name, "kind": "recipe", "source": str(recipe.path), "key": key}
        shown.append(about | {"built": False, "steps": steps})
    if args.json:
        print(json.dumps(shown if len(shown) > 1 else shown[0], indent=2))
        return 0
    for number, image in enumerate(shown):
        if number:
            print()
        print(f"image    {image['name']}\nkind     {image['kind']}\nsource   {image['source']}")
        if image["key"]:
            print(f"key      {image['key']}")
        if not image["built"]:
            print("built    no (nsbox images build NAME)")
            for step in image["steps"]:  # type: ignore[attr-defined]
                print(f"step     {step}")
            continue
        print(f"created  {image['created']}\nused     {image['last_used']}")
        for layer in image["layers"]:  # type: ignore[attr-defined]
            print(f"layer    {layer['layer']}  {format_size(layer['size']):>10}  {layer['created_by']}")
    return 0


def cmd_images_save(args: argparse.Namespace) -> int:
    """Write images (with their layers) to one tar file: what a CI cache should keep (see README)."""
    project = _project()
    cache_dir = _cache(args, project)
    dirs = _recipe_dirs(args, project)
    with cache.InUse(cache_dir):
        chosen = _named(cache.list_images(cache_dir), args.names, project, dirs)
        if isinstance(chosen, str):
            return _no_image(chosen, cache_dir)
        size = archive.save(cache_dir, chosen, Path(args.output))
    print(f"{', '.join(args.names)}: {sum(len(r.layers) for r in chosen)} layers, {format_size(size)} in {args.output}")
    return 0


def cmd_images_load(args: argparse.Namespace) -> int:
    """Put the images of a file written by 'nsbox images save' into the cache; layers it has are kept."""
    cache_dir = _cache(args, _project())
    with cache.InUse(cache_dir):
        names, extracted = archive.load(cache_dir, Path(args.input))
    print(f"{', '.join(names)}: {extracted} layer(s) loaded into {cache_dir}")
    return 0


def _carry_out(removal: cache.Removal, cache_dir: Path, *, dry_run: bool) -> int:
    """Say what *removal* frees; remove it unless --dry-run (hold ``cache.exclusive``)."""
    what = f"{len(removal.layers)} layer(s)"
    if removal.leftovers:
        what += f" and {len(removal.leftovers)} leftover(s) of interrupted builds"
    freed = format_size(removal.size)
    for record in removal.images:
        print(f"{'would forget' if dry_run else 'forgetting'} image {record.name} ({record.kind}, {record.source})")
    for layer in removal.layers:
        print(f"{'would remove' if dry_run else 'removing'} layer {layer}")
    if dry_run:
        print(f"would remove {what}, freeing {freed} in {cache_dir}")
        return 0
    if not (removal.layers or removal.images or removal.leftovers):
        print(f"removed 0 layer(s): nothing to free in {cache_dir}")
        return 0
    cache.remove(cache_dir, removal)
    print(f"removed {what}, freed {freed} in {cache_dir}")
    return 0


def _confirmed(removal: cache.Removal) -> bool:
    """On a terminal: ask before removing (asked before the cache is locked: runs wait for the lock)."""
    if not (removal.layers or removal.images or removal.leftovers) or not sys.stdin.isatty():
        return True
    answer = input(f"Remove {len(removal.layers)} layer(s) ({format_size(removal.size)})? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def cmd_images_rm(args: argparse.Namespace) -> int:
    """Remove images from the cache, with the layers no other image uses."""
    project = _project()
    cache_dir = _cache(args, project)
    dirs = _recipe_dirs(args, project)
    with cache.exclusive(cache_dir):
        forget = _named(cache.list_images(cache_dir), args.names, project, dirs)
        if isinstance(forget, str):
            return _no_image(forget, cache_dir)
        return _carry_out(cache.plan_removal(cache_dir, forget), cache_dir, dry_run=args.dry_run)


def cmd_images_prune(args: argparse.Namespace) -> int:
    """Remove the layers no image uses (and forget images unused for --older-than days); --dry-run shows what it would free."""
    cache_dir = _cache(args, _project())
    older = args.older_than * 86400 if args.older_than is not None else None
    if not (args.dry_run or args.force or _confirmed(cache.prune_plan(cache_dir, older_than=older))):
        print("nothing removed")
        return 1
    with cache.exclusive(cache_dir):  # planned again: what a run did meanwhile counts
        return _carry_out(cache.prune_plan(cache_dir, older_than=older), cache_dir, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsbox",
        description="pytest-nsbox: sandboxed tests. Reads the project's pytest ini file (pytest.ini, pyproject.toml, "
        "tox.ini, setup.cfg) from the current directory, as pytest does.",
    )
    parser.add_argument("--version", action="version", version=f"pytest-nsbox {__version__}")
    sub = parser.add_subparsers(dest="command_name", required=True)
    doctor = sub.add_parser("doctor", help=cmd_doctor.__doc__)
    doctor.set_defaults(func=cmd_doctor)
    shell = sub.add_parser("shell", help=cmd_shell.__doc__)
    shell.add_argument("image", nargs="?", help=IMAGE_HELP)
    shell.add_argument("--kept", metavar="NODEID", help="re-enter the kept sandbox of a test (pytest --nsbox-keep)")
    shell.add_argument("--run", help=argparse.SUPPRESS)
    shell.add_argument(
        "--network",
        choices=[n for n in NETWORKS if n != "private"],  # a private network lives in a test run, with its services
        default=None,
        help="'none' (default: only lo) or 'host'",
    )
    shell.add_argument("-e", "--env", action="append", metavar="KEY[=VALUE]", help="set a variable (KEY alone: yours)")
    shell.add_argument("-w", "--workdir", metavar="DIR", help="the working directory inside (default: the image's, or /)")
    for name, metavar, what in (
        ("memory", "SIZE", "memory limit, e.g. 256M"),
        ("pids", "N", "process limit"),
        ("cpus", "CPUS", "CPU bandwidth, e.g. 0.5"),
        ("timeout", "SECONDS", "wall-clock limit; exit 124 when it expires"),
        ("disk", "SIZE", "bound on what the command writes (default: the built-in bound)"),
    ):
        shell.add_argument(f"--{name}", metavar=metavar, help=what)
    shell.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: $SHELL)")
    shell.set_defaults(func=cmd_shell)
    for name, func in (("diff", cmd_diff), ("export", cmd_export)):
        command = sub.add_parser(name, help=func.__doc__)
        command.add_argument("nodeid", metavar="NODEID", help="the test's node id, as pytest prints it")
        command.add_argument("--run", metavar="RUN", help="a kept run's directory name (default: the newest with the test)")
        if name == "diff":
            command.add_argument("--json", action="store_true", help="print JSON")
        else:
            command.add_argument("-o", "--output", required=True, metavar="FILE", help="the tar file to write")
        command.set_defaults(func=func)
    # --cache-dir and --image-dir are accepted before and after the images subcommand
    cache_option = argparse.ArgumentParser(add_help=False)
    cache_option.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS,
        help="the layer cache (default: ini nsbox_cache_dir, else $XDG_CACHE_HOME/pytest-nsbox)",
    )
    recipe_option = argparse.ArgumentParser(add_help=False)
    recipe_option.add_argument(
        "--image-dir", action="append", default=argparse.SUPPRESS, help="another folder of recipes, searched first (repeatable)"
    )
    images = sub.add_parser("images", help="the image cache: list, build, key, import, inspect, save, load, rm, prune")
    images.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    images.add_argument("--image-dir", action="append", default=[], help=argparse.SUPPRESS)
    images_sub = images.add_subparsers(dest="images_command", required=True)
    both = [cache_option, recipe_option]
    images_sub.add_parser("list", parents=both, help=cmd_images_list.__doc__).set_defaults(func=cmd_images_list)
    build = images_sub.add_parser("build", parents=both, help=cmd_images_build.__doc__)
    build.add_argument("names", nargs="+", metavar="NAME", help="a recipe name")
    build.set_defaults(func=cmd_images_build)
    key = images_sub.add_parser("key", parents=both, help=cmd_images_key.__doc__)
    key.add_argument("names", nargs="+", metavar="NAME", help="a recipe name (several: one key for all)")
    key.set_defaults(func=cmd_images_key)
    imported = images_sub.add_parser("import", parents=[cache_option], help=cmd_images_import.__doc__)
    imported.add_argument("ref", help="oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE")
    imported.set_defaults(func=cmd_images_import)
    inspect = images_sub.add_parser("inspect", parents=both, help=cmd_images_inspect.__doc__)
    inspect.add_argument("name", help="a recipe name or an image reference")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_images_inspect)
    save = images_sub.add_parser("save", parents=both, help=cmd_images_save.__doc__)
    save.add_argument("names", nargs="+", metavar="NAME", help="a recipe name or an image reference")
    save.add_argument("-o", "--output", required=True, metavar="FILE", help="the tar file to write")
    save.set_defaults(func=cmd_images_save)
    load = images_sub.add_parser("load", parents=[cache_option], help=cmd_images_load.__doc__)
    load.add_argument("-i", "--input", required=True, metavar="FILE", help="a file written by 'nsbox images save'")
    load.set_defaults(func=cmd_images_load)
    remove = images_sub.add_parser("rm", parents=both, help=cmd_images_rm.__doc__)
    remove.add_argument("names", nargs="+", metavar="NAME", help="a recipe name or an image reference")
    remove.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    remove.set_defaults(func=cmd_images_rm)
    prune = images_sub.add_parser("prune", parents=[cache_option], help=cmd_images_prune.__doc__)
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="also forget images unused for DAYS days")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed and freed, remove nothing")
    prune.add_argument("-f", "--force", action="store_true", help="do not ask on a terminal")
    prune.set_defaults(func=cmd_images_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except cache.CacheBusy as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return 1
    except (NsboxError, OSError, kept.KeepError) as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
