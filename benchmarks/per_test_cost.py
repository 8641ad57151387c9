#!/usr/bin/env python3
"""Marginal wall-clock cost of one trivial test under each way of running it.

For every configuration (plain pytest, pytest-forked, pytest-nsbox with the host image, ...) the
script runs a generated file of N trivial tests and a file of 1 test, each as its own pytest
process, and takes per-test cost = (wall(N) - wall(1)) / (N - 1): startup, plugin loading and
collection cancel out. Configurations are interleaved (every round runs every job once, in a
shuffled order) so that drift on the machine hits all of them alike; the table reports medians over
the rounds and the ratio to pytest-forked.

pytest-forked 1.7.5 fails every test under pytest 9, so forked runs in a second venv on pytest
8.4.2 (created on first use under the cache directory), which also gets pytest-nsbox installed
editable so that nsbox can be compared with forked on the same pytest.

Each configuration is checked before it is timed: every run must report exactly N passed, and a
probe test must show the expected isolation (in-process, forked, or in its own mount namespace),
so a sandbox that silently fell back to running in-process cannot produce a flattering number.

Usage: python benchmarks/per_test_cost.py [--n 200] [--rounds 5] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

REPO: Final = Path(__file__).resolve().parent.parent
PYTEST8_REQUIREMENTS: Final = ("pytest==8.4.2", "pytest-forked==1.7.5")
PROBE_TAG: Final = "NSBOX-BENCH-PROBE"
BASE_ARGS: Final = ("-q", "-p", "no:cacheprovider")
# Environment variables that would change what pytest (or the plugin) does in the timed runs.
SCRUBBED_ENV: Final = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_NSBOX_REQUIRE")
SUMMARY_RE: Final = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|warnings?|deselected|rerun)\b")
DURATION_RE: Final = re.compile(r"\bin ([0-9]+(?:\.[0-9]+)?)s\b")

Venv = Literal["main", "pytest8"]
Isolation = Literal["in-process", "forked", "namespaced"]


class BenchError(Exception):
    """A configuration could not be set up or did not pass; the message says which and why."""


@dataclass(frozen=True)
class BenchConfig:
    """One way of running the generated tests.

    ``args`` are appended to the common pytest arguments; ``marker`` (a decorator line such as
    ``@pytest.mark.nsbox("host", memory="256M")``) is put on every generated test; ``isolation``
    is what the probe test must observe.
    """

    name: str
    venv: Venv
    args: tuple[str, ...]
    isolation: Isolation
    description: str
    env: Mapping[str, str] = field(default_factory=dict)
    marker: str | None = None


NSBOX_HOST_ARGS: Final = ("--nsbox-all", "--nsbox-require", "-o", "nsbox_image=host")

# Add configurations here (see README.md); REFERENCE names the one the ratio column divides by.
CONFIGS: Final[tuple[BenchConfig, ...]] = (
    BenchConfig("plain", "main", ("-p", "no:nsbox"), "in-process", "plain pytest, nsbox plugin disabled"),
    BenchConfig("plain@8", "pytest8", ("-p", "no:nsbox", "-p", "no:forked"), "in-process", "plain pytest on pytest 8.4.2"),
    BenchConfig("forked", "pytest8", ("--forked", "-p", "no:nsbox"), "forked", "pytest-forked 1.7.5 (--forked)"),
    BenchConfig("nsbox-host@8", "pytest8", (*NSBOX_HOST_ARGS, "-p", "no:forked"), "namespaced", "--nsbox-all, host image"),
    BenchConfig("nsbox-host", "main", NSBOX_HOST_ARGS, "namespaced", "--nsbox-all, host image"),
    BenchConfig(
        "nsbox-busybox",
        "main",
        ("--nsbox-all", "--nsbox-require", "-o", "nsbox_image=busybox", "-o", f"nsbox_image_dirs={REPO / 'rootfs_images'}"),
        "namespaced",
        "--nsbox-all, busybox recipe image (cached layers)",
    ),
    BenchConfig(
        "nsbox-mem256",
        "main",
        (*NSBOX_HOST_ARGS, "-o", "nsbox_memory=256M"),
        "namespaced",
        "--nsbox-all, host image, memory limit 256M (a cgroup per test)",
    ),
    BenchConfig(
        "nsbox-private",
        "main",
        NSBOX_HOST_ARGS,
        "namespaced",
        "host image, network='private' (a veth into the run's bridge per test)",
        marker='@pytest.mark.nsbox(network="private")',
    ),
)
REFERENCE: Final = "forked"


@dataclass(frozen=True)
class RunResult:
    wall: float  # seconds, whole pytest process
    session: float  # seconds, as reported on pytest's summary line
    cpu: float  # seconds of user + system time of pytest and every process it started and reaped


@dataclass
class Samples:
    wall_n: list[float] = field(default_factory=list)
    wall_1: list[float] = field(default_factory=list)
    session_n: list[float] = field(default_factory=list)
    session_1: list[float] = field(default_factory=list)
    cpu_n: list[float] = field(default_factory=list)
    cpu_1: list[float] = field(default_factory=list)


# --- environments ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-nsbox-bench"


def ensure_pytest8_venv(venv_dir: Path, base_python: str) -> Path:
    """Create (once) a venv with pytest 8.4.2, pytest-forked and pytest-nsbox (editable)."""
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / ".bench-requirements"
    wanted = "\n".join((*PYTEST8_REQUIREMENTS, f"-e {REPO}"))
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    log(f"creating {venv_dir} ({', '.join(PYTEST8_REQUIREMENTS)}, pytest-nsbox editable)")
    steps = (
        [base_python, "-m", "venv", str(venv_dir)],
        [str(python), "-m", "pip", "install", "-q", *PYTEST8_REQUIREMENTS, "-e", str(REPO)],
    )
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    stamp.write_text(wanted)
    return python


def package_versions(python: Path) -> str:
    code = (
        "import importlib.metadata as m, platform\n"
        "def v(d):\n"
        "    try: return m.version(d)\n"
        "    except m.PackageNotFoundError: return '-'\n"
        "print(f\"python {platform.python_version()}, pytest {v('pytest')}, \"\n"
        "      f\"pytest-forked {v('pytest-forked')}, pytest-nsbox {v('pytest-nsbox')}\")\n"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{python} cannot report its packages:\n{proc.stderr}")
    return proc.stdout.strip()


def pytest_version(versions: str) -> str:
    match = re.search(r"pytest ([^,]+)", versions)
    return match.group(1) if match else "?"


# --- generated tests -------------------------------------------------------------------------


def write_test_file(path: Path, count: int, marker: str | None) -> None:
    decorator = f"{marker}\n" if marker else ""
    body = "".join(f"\n\n{decorator}def test_{i}():\n    assert 1\n" for i in range(count))
    path.write_text(f"import pytest  # noqa: F401  (markers)\n{body}")


PROBE_SOURCE: Final = f"""\
import os
import pytest  # noqa: F401  (markers)

COLLECTED_IN = os.getpid()  # the pytest process itself imports the module


{{decorator}}def test_probe():
    print({PROBE_TAG!r}, COLLECTED_IN, os.getpid(), os.readlink("/proc/self/ns/mnt"))
"""


def test_dir_for(workdir: Path, config: BenchConfig, n: int) -> Path:
    """The directory with ``test_n{n}.py``, ``test_n1.py`` and ``test_probe.py`` for the config's marker."""
    slug = "unmarked" if config.marker is None else re.sub(r"[^A-Za-z0-9]+", "_", config.marker).strip("_")
    directory = workdir / slug
    if not directory.exists():
        directory.mkdir()
        write_test_file(directory / f"test_n{n}.py", n, config.marker)
        write_test_file(directory / "test_n1.py", 1, config.marker)
        decorator = f"{config.marker}\n" if config.marker else ""
        (directory / "test_probe.py").write_text(PROBE_SOURCE.replace("{decorator}", decorator))
    return directory


# --- running pytest --------------------------------------------------------------------------


class Runner:
    def __init__(self, workdir: Path, pythons: Mapping[Venv, Path], timeout: float) -> None:
        self.workdir = workdir
        self.pythons = pythons
        self.timeout = timeout
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}

    def command(self, config: BenchConfig, test_file: Path, *extra: str) -> list[str]:
        rel = str(test_file.relative_to(self.workdir))
        return [str(self.pythons[config.venv]), "-m", "pytest", *BASE_ARGS, *config.args, *extra, rel]

    def run(self, config: BenchConfig, test_file: Path, expected_passed: int, *extra: str) -> tuple[RunResult, str]:
        cmd = self.command(config, test_file, *extra)
        env = {**self.env, **config.env}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"[{config.name}] timed out after {self.timeout:.0f}s: {shlex.join(cmd)}") from exc
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        session = check_outcome(config, cmd, proc, expected_passed)
        return RunResult(wall, session, cpu), proc.stdout


def check_outcome(config: BenchConfig, cmd: Sequence[str], proc: subprocess.CompletedProcess[str], n: int) -> float:
    """Return pytest's reported session time if exactly *n* tests passed; otherwise raise BenchError."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else ""
    counts = {
        kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(num) for num, kind in SUMMARY_RE.findall(summary)
    }
    counts.pop("warning", None)  # warnings do not change the outcome
    duration = DURATION_RE.search(summary)
    if proc.returncode == 0 and counts == {"passed": n} and duration:
        return float(duration.group(1))
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    raise BenchError(
        f"[{config.name}] expected '{n} passed', got {summary!r} (exit status {proc.returncode})\n"
        f"  command: {shlex.join(cmd)}\n  last lines of output:\n{tail}"
    )


def check_isolation(config: BenchConfig, runner: Runner, directory: Path) -> str:
    """Run the probe test once and check that it ran where the config says it does."""
    _, stdout = runner.run(config, directory / "test_probe.py", 1, "-rP")
    match = re.search(rf"{PROBE_TAG} (\d+) (\d+) (\S+)", stdout)
    if match is None:
        raise BenchError(f"[{config.name}] the probe test printed no {PROBE_TAG} line (is -rP honoured?):\n{stdout}")
    pytest_pid, pid, mnt_ns = int(match.group(1)), int(match.group(2)), match.group(3)
    # The pytest process is our child and so runs in our mount namespace.
    seen: Isolation
    if mnt_ns != os.readlink("/proc/self/ns/mnt"):
        seen = "namespaced"
    elif pid != pytest_pid:
        seen = "forked"
    else:
        seen = "in-process"
    if seen != config.isolation:
        raise BenchError(f"[{config.name}] the probe test ran {seen} (pid {pid}, {mnt_ns}), expected {config.isolation}")
    return seen


# --- measurement -----------------------------------------------------------------------------


def measure(configs: Sequence[BenchConfig], runner: Runner, n: int, rounds: int, warmup: int, seed: int) -> dict[str, Samples]:
    rng = random.Random(seed)
    dirs = {c.name: test_dir_for(runner.workdir, c, n) for c in configs}
    jobs = [(c, count) for c in configs for count in (n, 1)]
    samples = {c.name: Samples() for c in configs}
    for r in range(-warmup, rounds):
        rng.shuffle(jobs)
        label = f"warm-up {r + warmup + 1}/{warmup}" if r < 0 else f"round {r + 1}/{rounds}"
        for config, count in jobs:
            result, _ = runner.run(config, dirs[config.name] / f"test_n{count}.py", count)
            log(f"{label}: {config.name:<14} N={count:<5} {result.wall:7.3f}s")
            if r < 0:
                continue
            s = samples[config.name]
            (s.wall_n if count == n else s.wall_1).append(result.wall)
            (s.session_n if count == n else s.session_1).append(result.session)
            (s.cpu_n if count == n else s.cpu_1).append(result.cpu)
    return samples


def marginal_ms(big: Sequence[float], one: Sequence[float], n: int) -> list[float]:
    """Per-round marginal cost of one test, in milliseconds."""
    return [(b - s) / (n - 1) * 1000 for b, s in zip(big, one, strict=True)]


def render_table(configs: Sequence[BenchConfig], samples: Mapping[str, Samples], n: int, versions: Mapping[Venv, str]) -> str:
    per_test = {c.name: marginal_ms(samples[c.name].wall_n, samples[c.name].wall_1, n) for c in configs}
    reference = statistics.median(per_test[REFERENCE]) if REFERENCE in per_test else None
    rows = [
        "| config | pytest | per-test ms (median) | min-max ms | x forked | in-session ms | CPU ms | wall N s | wall 1 s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configs:
        s, costs = samples[c.name], per_test[c.name]
        median = statistics.median(costs)
        ratio = f"{median / reference:.2f}" if reference else "-"
        session = statistics.median(marginal_ms(s.session_n, s.session_1, n))
        cpu = statistics.median(marginal_ms(s.cpu_n, s.cpu_1, n))
        rows.append(
            f"| {c.name} | {pytest_version(versions[c.venv])} | {median:.2f} | {min(costs):.2f}-{max(costs):.2f} "
            f"| {ratio} | {session:.2f} | {cpu:.2f} | {statistics.median(s.wall_n):.3f} | {statistics.median(s.wall_1):.3f} |"
        )
    return "\n".join(rows)


def render_report(
    configs: Sequence[BenchConfig],
    samples: Mapping[str, Samples],
    args: argparse.Namespace,
    versions: Mapping[Venv, str],
) -> str:
    uname = os.uname()
    lines = [
        f"# per-test cost, N={args.n}, {args.rounds} rounds (+{args.warmup} warm-up), seed {args.seed}",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- host: {uname.sysname} {uname.release} {platform.machine()}, {os.cpu_count()} CPUs",
        *(f"- venv {name}: {text}" for name, text in versions.items()),
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        "",
        render_table(configs, samples, args.n, versions),
        "",
        "per-test = (wall(N) - wall(1)) / (N - 1) per round, median over rounds; in-session uses pytest's own",
        "'passed in Xs' instead of wall time (no interpreter start-up); CPU is the same marginal of the user and",
        "system time of pytest and all its reaped descendants (what the test costs when every core is busy,",
        "as under xdist -n auto, where work done beside the test is no longer free). Configs:",
        "",
        *(f"- `{c.name}`: {c.description}; args `{shlex.join(c.args)}`" for c in configs),
    ]
    return "\n".join(lines) + "\n"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = ", ".join(c.name for c in CONFIGS)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="tests in the large file (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the per-round job order (default 1)")
    parser.add_argument("--configs", default="", help=f"comma-separated subset of: {names}")
    parser.add_argument("--output", type=Path, help="also write the markdown report to this file")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of the main venv (default: the one running this script)"
    )
    parser.add_argument(
        "--venv-dir",
        type=Path,
        default=default_cache_dir() / "venv-pytest-8.4.2",
        help="venv with pytest 8.4.2 + pytest-forked, created if missing (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds before one pytest run is killed")
    args = parser.parse_args(argv)
    if args.n < 2 or args.rounds < 1 or args.warmup < 0:
        parser.error("need --n >= 2, --rounds >= 1, --warmup >= 0")
    return args


def select_configs(spec: str) -> list[BenchConfig]:
    if not spec:
        return list(CONFIGS)
    by_name = {c.name: c for c in CONFIGS}
    unknown = [name for name in spec.split(",") if name not in by_name]
    if unknown:
        raise BenchError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[name] for name in spec.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pytest-nsbox-bench-"))
    try:
        configs = select_configs(args.configs)
        pythons: dict[Venv, Path] = {"main": Path(args.python)}
        if any(c.venv == "pytest8" for c in configs):
            pythons["pytest8"] = ensure_pytest8_venv(args.venv_dir, args.python)
        versions = {name: package_versions(python) for name, python in pythons.items()}
        for name, text in versions.items():
            log(f"venv {name}: {pythons[name]}: {text}")
        (workdir / "pytest.ini").write_text("[pytest]\n")  # rootdir here; no ini from above leaks in
        runner = Runner(workdir, pythons, args.timeout)
        for config in configs:
            seen = check_isolation(config, runner, test_dir_for(workdir, config, args.n))
            log(f"check: {config.name:<14} runs tests {seen}")
        samples = measure(configs, runner, args.n, args.rounds, args.warmup, args.seed)
        report = render_report(configs, samples, args, versions)
    except BenchError as exc:
        log(f"per_test_cost: {exc}")
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report, end="")
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
