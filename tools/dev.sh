#!/usr/bin/env bash
# Set up and run pytest-nsbox on a fresh Debian/Ubuntu machine.
#   tools/dev.sh demo    install, then run the demo suite in examples/
#   tools/dev.sh test    install, then run lint, type checks and the test suite, then the suite
#                        without the slow tests on the oldest pytest pyproject.toml admits
#                        (as root also the rootless sub-suite, as an unprivileged user)
#   tools/dev.sh compat  run tests/compat in a venv with the pinned plugins of the compat extra
#   tools/dev.sh wheel   build the sdist and the wheel, and run a project outside the repository
#                        against the installed wheel (part of test)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${NSBOX_VENV:-$REPO/.venv}
OLDEST_VENV=${NSBOX_OLDEST_VENV:-$REPO/.venv-oldest}
COMPAT_VENV=${NSBOX_COMPAT_VENV:-$REPO/.venv-compat}
ROOTLESS_USER=${NSBOX_ROOTLESS_USER:-nsboxci}
# what runs again on cgroup v2 (User-Mode Linux; not the slow tests: forks are 10-25x slower there): the limits,
# the disk bound (charged to memory), doctor, the private network (netem is only there)
UML_TESTS="tests/integration/test_limits.py tests/integration/test_disk.py tests/integration/test_doctor.py tests/integration/test_network.py"

apt_install() {
  # Debian packages the project needs: python3-venv (the rootless venv), uidmap (rootless image builds).
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then echo "please install: ${missing[*]}" >&2; exit 1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

make_venv() {  # make_venv PYTHON DIR
  local python=$1 dir=$2
  [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[dev]"
}

oldest_pins() {
  # pyproject.toml's lower bounds of pytest, pluggy (dependencies) and pytest-xdist (dev), as exact pins
  "$VENV/bin/python" - <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = {}
for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    match = re.fullmatch(r"(pytest|pluggy|pytest-xdist)>=([0-9.]+)", requirement.replace(" ", ""))
    if match:
        pins[match[1]] = f"{match[1]}=={match[2]}"
if len(pins) != 3:
    sys.exit(f"pyproject.toml: expected 'NAME>=VERSION' for pytest, pluggy and pytest-xdist, found {sorted(pins)}")
print(" ".join(pins.values()))
EOF
}

run_oldest() {
  # The private API pytest-nsbox uses (compat.py) must work on the oldest pytest it admits too.
  local pins
  pins=$(oldest_pins)
  echo "== the suite without the slow tests, on the oldest admitted versions: $pins"
  if [ ! -x "$OLDEST_VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$OLDEST_VENV"
    echo "*" > "$OLDEST_VENV/.gitignore"
  fi
  # shellcheck disable=SC2086  # $pins: one word per pin
  "$OLDEST_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO" $pins
  "$OLDEST_VENV/bin/python" -m pytest -p no:cacheprovider -n 2 -m "not slow" --ignore=tests/compat tests
}

run_compat() {  # run_compat [VENV]: tests/compat against the pinned plugins of the compat extra
  local venv=${1:-$COMPAT_VENV}
  echo "== tests/compat: pytest-nsbox with the plugins people combine it with (pyproject.toml's compat extra)"
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
    echo "*" > "$venv/.gitignore"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[dev,compat]"
  "$venv/bin/python" -m pytest -p no:cacheprovider -p no:randomly -o asyncio_default_fixture_loop_scope=function -n 2 tests/compat
}

add_subids() {  # add_subids FILE --add-subuids|--add-subgids: give the user 65536 subordinate ids once
  local file=$1 option=$2 uid start
  uid=$(id -u "$ROOTLESS_USER")
  # useradd adds a range when login.defs asks for it; newuidmap accepts the name or the uid
  awk -F: -v u="$ROOTLESS_USER" -v n="$uid" '($1 == u || $1 == n) && $3 >= 65536 { found = 1 } END { exit !found }' \
    "$file" 2>/dev/null && return
  # the first id after every range already given out (100000 if none)
  start=$(awk -F: 'BEGIN { m = 100000 } NF == 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$file" 2>/dev/null || echo 100000)
  usermod "$option" "$start-$((start + 65535))" "$ROOTLESS_USER"
}

run_rootless() {
  # The rootless sub-suite: an unprivileged user, a venv from Debian's interpreter (the default
  # one may live under /root, mode 0700), a copy of the checkout that user can read.
  id "$ROOTLESS_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$ROOTLESS_USER"
  add_subids /etc/subuid --add-subuids  # rootless debian builds: mmdebstrap --mode=unshare, run steps
  add_subids /etc/subgid --add-subgids
  local work cgroup_root="pytest-nsbox-$ROOTLESS_USER"
  work=$(mktemp -d /tmp/nsbox-rootless-XXXXXX)
  # cgroup v1: a directory per controller that root hands to the user (what an admin does once)
  for ctrl in memory pids cpu; do
    if [ -d "/sys/fs/cgroup/$ctrl" ] && [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
      mkdir -p "/sys/fs/cgroup/$ctrl/$cgroup_root"
      chown -R "$ROOTLESS_USER:" "/sys/fs/cgroup/$ctrl/$cgroup_root"
    fi
  done
  trap 'rm -rf "$work"; for c in memory pids cpu; do rmdir /sys/fs/cgroup/$c/'"$cgroup_root"'/nsbox-* /sys/fs/cgroup/$c/'"$cgroup_root"' 2>/dev/null || true; done' RETURN
  git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 cp --parents -t "$work")
  chown -R "$ROOTLESS_USER:" "$work"
  chmod 755 "$work"
  local user_env=(env -i HOME="/home/$ROOTLESS_USER" PATH=/usr/bin:/bin CI="${CI:-}"
                  PYTEST_NSBOX_REQUIRE="${PYTEST_NSBOX_REQUIRE:-}" PYTEST_NSBOX_CGROUP_ROOT="$cgroup_root")
  runuser -u "$ROOTLESS_USER" -- "${user_env[@]}" \
    bash -c "cd '$work' && /usr/bin/python3 -m venv .venv && .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' \
             && .venv/bin/python -m pytest -p no:cacheprovider -n 2 -m 'not needs_root' --ignore=tests/compat tests \
             && NSBOX_COMPAT_VENV=\$PWD/.venv-compat PYTHON=/usr/bin/python3 bash tools/dev.sh compat"
  if [ "${NSBOX_SKIP_UML:-}" != 1 ]; then
    # cgroup v2, rootless: root delegates a subtree (chown), the user's pytest runs beside it.
    echo "== limits tests on cgroup v2 (User-Mode Linux), as $ROOTLESS_USER"
    local d="/sys/fs/cgroup/$ROOTLESS_USER"
    tools/uml-run.sh "set -e; mkdir -p $d/runner; echo \$\$ > $d/runner/cgroup.procs
      echo '+memory +pids +cpu' > $d/cgroup.subtree_control
      chown $ROOTLESS_USER: $d $d/cgroup.procs $d/cgroup.subtree_control $d/cgroup.threads
      cd '$work' && runuser -u $ROOTLESS_USER -- env -i HOME=/home/$ROOTLESS_USER PATH=/usr/bin:/bin \
        PYTEST_NSBOX_REQUIRE='${PYTEST_NSBOX_REQUIRE:-}' PYTEST_NSBOX_CGROUP_ROOT=$ROOTLESS_USER \
        .venv/bin/python -m pytest -p no:cacheprovider -m 'not slow' $UML_TESTS"
  fi
}

run_uml_limits() {
  # cgroup v2 as root: the guest's pytest lives in the root cgroup, sandboxes are its children.
  echo "== limits tests on cgroup v2 (User-Mode Linux), as root"
  tools/uml-run.sh "PYTEST_NSBOX_REQUIRE='${PYTEST_NSBOX_REQUIRE:-}' $VENV/bin/python -m pytest -p no:cacheprovider -m 'not slow' $UML_TESTS"
}

run_wheel() {
  # pytest-nsbox as a user gets it: the sdist and the wheel built from the tracked files (a build
  # warning fails), the wheel (not an editable install) in a fresh venv outside the repository,
  # and a small project of its own under /tmp run against it: a shipped image by name, a memory
  # limit a test hits, a service on the private network, xdist.
  echo "== the wheel: built without warnings, installed outside the repository, run by a project of its own"
  local work python=${PYTHON:-python3}
  work=$(mktemp -d /tmp/nsbox-wheel-XXXXXX)
  trap 'rm -rf "$work"; trap - RETURN' RETURN
  mkdir "$work/src" "$work/dist" "$work/project"
  git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 cp --parents -t "$work/src")
  "$python" -m venv "$work/build-venv"
  local requires
  requires=$("$work/build-venv/bin/python" -c 'import sys, tomllib; print(*tomllib.load(sys.stdin.buffer)["build-system"]["requires"])' \
             < "$REPO/pyproject.toml")
  # shellcheck disable=SC2086  # $requires: one word per requirement
  "$work/build-venv/bin/python" -m pip install -q --disable-pip-version-check build $requires
  # The backend runs in the build venv (no isolation: pip's own notices stay out of the log); the
  # wheel is built from the sdist, so a file missing from the sdist is missing from the wheel.
  # PYTHONDONTWRITEBYTECODE would make setuptools warn that byte-compiling is disabled.
  if ! (cd "$work/src" && env -u PYTHONDONTWRITEBYTECODE "$work/build-venv/bin/python" -m build --no-isolation -o "$work/dist" .) \
      > "$work/build.log" 2>&1; then
    cat "$work/build.log"; echo "the build failed" >&2; return 1
  fi
  # setuptools' "WARNING ...", distutils' "warning: ...", Python's "...Warning: ..." (not a file named warnings.py)
  if grep -iE '(^|[[:space:]])warning\b|warning:' "$work/build.log"; then echo "the build warned (lines above; full log: python -m build)" >&2; return 1; fi
  # Every tracked module and shipped recipe file is in both (the packages list in pyproject.toml is explicit).
  (cd "$REPO" && git ls-files pytest_nsbox rootfs_images | grep -E '^(pytest_nsbox/.*[.]py|rootfs_images/.*)$') > "$work/expected"
  "$work/build-venv/bin/python" - "$work/dist" "$work/expected" <<'EOF'
import pathlib, sys, tarfile, zipfile
dist, expected = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text().split()
(sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
in_sdist = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
installed = [f"pytest_nsbox/{f}" if f.startswith("rootfs_images/") else f for f in expected]
missing = [f"{sdist.name}: {f}" for f in expected if f not in in_sdist] + [f"{wheel.name}: {f}" for f in installed if f not in in_wheel]
if missing or not any(f.startswith("rootfs_images/") for f in expected):
    sys.exit("missing from the distributions:\n  " + "\n  ".join(missing or ["(no shipped recipes?)"]))
print(f"{sdist.name}, {wheel.name}: {len(expected)} tracked files each, shipped recipes included")
EOF
  "$python" -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$work"/dist/*.whl pytest-xdist
  local project=$work/project
  cat > "$project/pyproject.toml" <<EOF
[project]
name = "uses-nsbox"
version = "0"

[tool.pytest.ini_options]
nsbox_cache_dir = "$work/cache"
EOF
  cat > "$project/test_uses_nsbox.py" <<'EOF'
import os
import socket
import sys

import pytest

from pytest_nsbox import nsbox


@nsbox(image="busybox")  # shipped with pytest-nsbox: this project has no rootfs_images/
def test_shipped_image_by_name():
    assert os.path.islink("/bin/cat") and not os.path.exists("/usr/bin/apt-get")
    assert socket.gethostname() == "nsbox"


@nsbox(image="busybox", pids=64)
def test_busybox_under_a_pids_limit():
    assert os.system("/bin/echo ok") == 0


@nsbox(memory="64M")
def test_memory_limit_is_hit():  # expected to FAIL: the test exceeds its memory limit
    data = bytearray(2**30)
    assert data


def test_not_sandboxed():
    assert socket.gethostname() != "nsbox"


@pytest.fixture(scope="module")
def echo(nsbox_service):  # a service on the private network: the installed wheel's network process
    server = "import socket\ns = socket.create_server(('0.0.0.0', 7000))\nwhile True:\n    c = s.accept()[0]\n    c.sendall(c.recv(10))\n    c.close()"
    return nsbox_service("echo", command=[sys.executable, "-c", server], ready_port=7000)


@nsbox(network="private")
def test_private_network(echo):
    with socket.create_connection(("echo", 7000), timeout=5) as c:
        c.sendall(b"ping")
        assert c.recv(10) == b"ping"
EOF
  (cd "$project" && "$work/venv/bin/nsbox" images --cache-dir "$work/cache" build nope) 2> "$work/build-nope.err" && return 1
  grep -F "known: busybox, debian-bookworm, debian-bookworm-curl, debian-bookworm-redis" "$work/build-nope.err" \
    || { cat "$work/build-nope.err"; echo "the installed CLI does not list the shipped recipes" >&2; return 1; }
  local status=0
  (cd "$project" && "$work/venv/bin/python" -m pytest -p no:cacheprovider -n 2 -rA --nsbox-require) > "$work/pytest.log" 2>&1 || status=$?
  cat "$work/pytest.log"
  local line
  for line in "2 workers [5 items]" \
      "PASSED test_uses_nsbox.py::test_private_network" \
      "PASSED test_uses_nsbox.py::test_shipped_image_by_name" \
      "PASSED test_uses_nsbox.py::test_busybox_under_a_pids_limit" \
      "PASSED test_uses_nsbox.py::test_not_sandboxed" \
      "FAILED test_uses_nsbox.py::test_memory_limit_is_hit" \
      "nsbox: test exceeded its memory limit of 64 MiB" \
      "1 failed, 4 passed"; do
    grep -qF -- "$line" "$work/pytest.log" || { echo "the project's run lacks: $line" >&2; return 1; }
  done
  [ "$status" -eq 1 ] || { echo "the project's run exited $status, expected 1 (one test fails on purpose)" >&2; return 1; }
  # the installed CLI reads the project's ini (its nsbox_cache_dir) and lists the recipe the run built
  (cd "$project" && "$work/venv/bin/nsbox" images list) > "$work/list.log"
  grep -qE "^busybox +recipe +1 " "$work/list.log" && grep -qF "in $work/cache" "$work/list.log" \
    || { cat "$work/list.log"; echo "nsbox images list (from the project) does not show the busybox image the run built" >&2; return 1; }
  echo "== the wheel: ok"
}

run_demo() {
  # The demo as the README runs it (examples/: a real database as a service builds debian-bookworm-redis)
  echo "== the demo: examples/"
  "$VENV/bin/python" -m pytest -p no:cacheprovider -v -rA examples
}

case "${1:-}" in
  demo)
    apt_install python3-venv mmdebstrap
    make_venv "${PYTHON:-python3}" "$VENV"
    run_demo
    ;;
  test)
    apt_install python3-venv user-mode-linux kmod mmdebstrap busybox-static zstd uidmap
    make_venv "${PYTHON:-python3}" "$VENV"
    "$VENV/bin/ruff" check pytest_nsbox tests benchmarks examples
    "$VENV/bin/mypy" pytest_nsbox
    "$VENV/bin/python" -m pytest -p no:cacheprovider -n 2 --ignore=tests/compat tests
    run_demo
    run_wheel
    run_compat
    run_oldest
    if [ "$(id -u)" -eq 0 ]; then
      [ "${NSBOX_SKIP_UML:-}" = 1 ] || run_uml_limits
      run_rootless
    fi
    ;;
  compat)
    run_compat
    ;;
  wheel)
    apt_install python3-venv busybox-static
    run_wheel
    ;;
  *)
    echo "usage: tools/dev.sh demo|test|compat|wheel" >&2
    exit 2
    ;;
esac
