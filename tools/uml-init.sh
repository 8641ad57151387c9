#!/bin/bash
# PID 1 of a User-Mode Linux guest (tools/uml-run.sh): a pure cgroup v2 kernel for the limits tests.
# The host's / is the guest's read-only root; the checkout (nsbox_repo) is shared read-write;
# /tmp, /root, /home and /var get overlays with their upper layers in guest RAM.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
status_file="$nsbox_repo/.uml/status"
finish() {
  echo "$1" > "$status_file"
  sync
  exec /usr/bin/python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321FEDC)'  # LINUX_REBOOT_CMD_POWER_OFF
}
trap 'finish 99' ERR
set -eE
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
stty -F /dev/console -onlcr 2>/dev/null || true
# the guest's modules (the host has no /lib/modules for this kernel): overlayfs, and what the private
# network needs (veth, bridge) and its faults (netem, tbf; the host kernel has no netem)
mkdir -p /run/modules/lib
ln -s /usr/lib/uml/modules /run/modules/lib/modules
modprobe -d /run/modules -a overlay veth bridge sch_netem sch_tbf
mkdir -p /run/rw
for dir in tmp root home var; do
  mkdir -p "/run/rw/$dir/upper" "/run/rw/$dir/work"
  mount -t overlay overlay -o "lowerdir=/$dir,upperdir=/run/rw/$dir/upper,workdir=/run/rw/$dir/work" "/$dir"
done
chmod 1777 /tmp
mount -t hostfs hostfs "$nsbox_repo" -o "$nsbox_repo"
mount -t tmpfs tmpfs /sys/fs/cgroup
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup
echo "+cpu +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
hostname nsbox-uml
ip link set lo up
cd "$nsbox_repo"
set +eE
trap - ERR
bash "$nsbox_repo/.uml/command" > "$nsbox_repo/.uml/output" 2>&1
finish $?
