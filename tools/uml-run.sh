#!/usr/bin/env bash
# Run a command inside a User-Mode Linux guest: a real Linux kernel with a pure cgroup v2
# hierarchy (memory, pids, cpu, io), which this machine's hybrid v1 setup cannot give.
#   tools/uml-run.sh 'COMMAND'      (run from the checkout; COMMAND runs there, as root in the guest)
# Prints the guest's output and exits with the command's status. Needs the Debian package
# user-mode-linux (tools/dev.sh installs it). See shared/notes/cgroup-v2-uml.md.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mkdir -p .uml
rm -f .uml/status .uml/output
printf '%s\n' "$1" > .uml/command
timeout -k 5 "${NSBOX_UML_TIMEOUT:-1800}" linux.uml mem=3G rootfstype=hostfs rootflags=/ ro \
  init="$repo/tools/uml-init.sh" con=null ssl=null con0=null,fd:1 con1=null,fd:2 quiet \
  nsbox_repo="$repo" < /dev/null > .uml/console 2>&1 || true
cat .uml/output 2>/dev/null || { echo "uml-run: the guest produced no output; its console:"; cat .uml/console; }
if [ ! -s .uml/status ]; then
  echo "uml-run: the guest did not report a status (crashed or timed out); console:" >&2
  tail -n 40 .uml/console >&2
  exit 1
fi
exit "$(cat .uml/status)"
