#!/usr/bin/env bash
# Set up and run pytest-nsbox on a fresh Debian/Ubuntu machine.
#   tools/dev.sh demo    install, then run the demo suite in examples/
#   tools/dev.sh test    install, then run lint, type checks and the test suite, then the suite
#                        without the slow tests on the oldest pytest pyproject.toml admits
#                        (as root also the rootless sub-suite, as an unprivileged user)
#   tools/dev.sh compat  run tests/compat in a venv with the pinned plugins of the compat extra
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${NSBOX_VENV:-$REPO/.venv}
OLDEST_VENV=${NSBOX_OLDEST_VENV:-$REPO/.venv-oldest}
COMPAT_VENV=${NSBOX_COMPAT_VENV:-$REPO/.venv-compat}
ROOTLESS_USER=${NSBOX_ROOTLESS_USER:-nsboxci}

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
        .venv/bin/python -m pytest -p no:cacheprovider tests/integration/test_limits.py"
  fi
}

run_uml_limits() {
  # cgroup v2 as root: the guest's pytest lives in the root cgroup, sandboxes are its children.
  echo "== limits tests on cgroup v2 (User-Mode Linux), as root"
  tools/uml-run.sh "PYTEST_NSBOX_REQUIRE='${PYTEST_NSBOX_REQUIRE:-}' $VENV/bin/python -m pytest -p no:cacheprovider tests/integration/test_limits.py"
}

case "${1:-}" in
  demo)
    apt_install python3-venv
    make_venv "${PYTHON:-python3}" "$VENV"
    exec "$VENV/bin/python" -m pytest -p no:cacheprovider -v -rA examples
    ;;
  test)
    apt_install python3-venv user-mode-linux kmod mmdebstrap busybox-static zstd uidmap
    make_venv "${PYTHON:-python3}" "$VENV"
    "$VENV/bin/ruff" check pytest_nsbox tests benchmarks examples
    "$VENV/bin/mypy" pytest_nsbox
    "$VENV/bin/python" -m pytest -p no:cacheprovider -n 2 --ignore=tests/compat tests
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
  *)
    echo "usage: tools/dev.sh demo|test|compat" >&2
    exit 2
    ;;
esac
