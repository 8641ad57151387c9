"""Image benchmarks: cold recipe build vs plain mmdebstrap, layer import vs tar -x.

    python benchmarks/images.py [--rounds 2] [--output FILE]

Interleaved rounds, medians. Needs root (Debian bases are built with mmdebstrap --mode=root).
The per-test cost of a cached image is measured by per_test_cost.py (config nsbox-busybox).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_nsbox.images import cache as layer_cache  # noqa: E402
from pytest_nsbox.images import oci, recipes  # noqa: E402


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def cold_build(work: Path) -> float:
    cache = work / "cache"
    dirs = [REPO / "rootfs_images"]
    recipe = recipes.find("debian-bookworm", dirs)
    assert recipe is not None
    seconds = timed(lambda: recipes.RecipeBuilder(cache, dirs, progress=lambda _line: None).build(recipe))
    layer_cache.remove_tree(cache)
    return seconds


def plain_mmdebstrap(work: Path) -> float:
    target = work / "rootfs"
    command = recipes.debian_command("bookworm", target)
    seconds = timed(lambda: subprocess.run(command, check=True, capture_output=True))
    layer_cache.remove_tree(target)
    return seconds


def make_layer_tar(work: Path) -> Path:
    """A real layer: the debian-bookworm rootfs as a plain tar."""
    rootfs = work / "layer-src"
    subprocess.run(
        ["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "bookworm", str(rootfs)], check=True, capture_output=True
    )
    layer = work / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(rootfs, arcname=".")
    layer_cache.remove_tree(rootfs)
    return layer


def import_layer(layer: Path, work: Path) -> float:
    cache = work / "import-cache"
    import hashlib

    digest = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    entry = oci.Layer(digest, lambda: open(layer, "rb"))
    seconds = timed(lambda: oci.ensure_layer(cache, entry, "benchmark"))
    layer_cache.remove_tree(cache)
    return seconds


def tar_extract(layer: Path, work: Path) -> float:
    target = work / "tar-x"
    target.mkdir()
    seconds = timed(lambda: subprocess.run(["tar", "-xf", str(layer), "-C", str(target)], check=True))
    layer_cache.remove_tree(target)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", help="also write the markdown report here")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        print("images.py needs root and mmdebstrap", file=sys.stderr)
        return 2
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nsbox-bench-images-") as tmp:
        work = Path(tmp)
        layer = make_layer_tar(work)
        size = layer.stat().st_size
        jobs: list[tuple[str, Callable[[], float]]] = [
            ("debian-bookworm recipe, cold", lambda: cold_build(work)),
            ("mmdebstrap, same options (floor)", lambda: plain_mmdebstrap(work)),
            ("import of the layer (nsbox)", lambda: import_layer(layer, work)),
            ("tar -x of the same layer", lambda: tar_extract(layer, work)),
        ]
        for round_number in range(args.rounds):
            order = jobs if round_number % 2 == 0 else jobs[::-1]
            for name, job in order:
                samples.setdefault(name, []).append(job())
    lines = [
        f"layer: debian bookworm minbase rootfs as a plain tar, {size / 2**20:.0f} MiB; {args.rounds} interleaved rounds",
        "",
        "| what | median s | runs | throughput |",
        "|---|---:|---|---:|",
    ]
    for name, values in samples.items():
        median = statistics.median(values)
        rate = f"{size / 2**20 / median:.0f} MiB/s" if "layer" in name else ""
        lines.append(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {rate} |")
    report = "\n".join(lines)
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
