"""Thin ctypes wrappers around the Linux syscalls the sandbox needs.

Mechanism only: C names, kernel constant names, bytes paths, no logging and no policy.
Every wrapper raises ``OSError(errno, "<call>(<args>): <strerror> (<ERRNO>)")`` on failure.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Callable

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/capability.h>
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_CAP = 40  # CAP_CHECKPOINT_RESTORE; higher numbers are probed at run time

# <linux/keyctl.h>
KEY_SPEC_SESSION_KEYRING = -3
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
_KEYCTL_NAMES = {KEYCTL_GET_KEYRING_ID: "KEYCTL_GET_KEYRING_ID", KEYCTL_JOIN_SESSION_KEYRING: "KEYCTL_JOIN_SESSION_KEYRING"}

# <asm/unistd_64.h> (x86_64); aarch64 numbers in the second column
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "capset": 126, "keyctl": 250},
    "aarch64": {"pivot_root": 41, "capset": 91, "keyctl": 219},
}

# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>
NETLINK_ROUTE = 0
NLMSG_ERROR = 0x2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_HOST = 254
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # len, type
_NLMSGERR = struct.Struct("=i")  # error (negative errno), then the request's header

# statvfs f_flag bits (<sys/statvfs.h>) mapped to the mount flags that carry them
ST_TO_MS = {
    os.ST_RDONLY: MS_RDONLY,
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}

_MS_NAMES = {
    MS_RDONLY: "MS_RDONLY",
    MS_NOSUID: "MS_NOSUID",
    MS_NODEV: "MS_NODEV",
    MS_NOEXEC: "MS_NOEXEC",
    MS_REMOUNT: "MS_REMOUNT",
    MS_NOATIME: "MS_NOATIME",
    MS_NODIRATIME: "MS_NODIRATIME",
    MS_BIND: "MS_BIND",
    MS_REC: "MS_REC",
    MS_PRIVATE: "MS_PRIVATE",
    MS_SLAVE: "MS_SLAVE",
    MS_RELATIME: "MS_RELATIME",
    MS_STRICTATIME: "MS_STRICTATIME",
}

_CLONE_NAMES = {
    CLONE_NEWUSER: "CLONE_NEWUSER",
    CLONE_NEWNS: "CLONE_NEWNS",
    CLONE_NEWPID: "CLONE_NEWPID",
    CLONE_NEWNET: "CLONE_NEWNET",
    CLONE_NEWUTS: "CLONE_NEWUTS",
    CLONE_NEWIPC: "CLONE_NEWIPC",
    CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
}


def _flag_names(flags: int, names: dict[int, str]) -> str:
    parts = [name for bit, name in names.items() if flags & bit]
    rest = flags & ~sum(names)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or "0"


def mount_flag_names(flags: int) -> str:
    """Render mount flags as ``MS_BIND|MS_REC``."""
    return _flag_names(flags, _MS_NAMES)


def clone_flag_names(flags: int) -> str:
    """Render namespace flags as ``CLONE_NEWUSER|CLONE_NEWNS``."""
    return _flag_names(flags, _CLONE_NAMES)


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


@functools.cache
def _libc() -> ctypes.CDLL:
    # Lazy: importing the plugin on a platform without glibc must not fail.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(rc: int, describe: Callable[[], str]) -> int:
    """Raise OSError for a failed call; *describe* renders the call only when it failed."""
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{describe()}: {os.strerror(err)} ({errno_name(err)})")
    return rc


@functools.cache
def _syscall_number(name: str) -> int:
    machine = os.uname().machine
    try:
        return _SYSCALLS[machine][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name}: no syscall number known for {machine}") from None


def unshare(flags: int) -> None:
    _check(_libc().unshare(flags), lambda: f"unshare({clone_flag_names(flags)})")


def setns(fd: int, nstype: int) -> None:
    """Join the namespaces *nstype* of the process a pidfd refers to (or the one namespace of an nsfs fd)."""
    _check(_libc().setns(fd, nstype), lambda: f"setns({fd}, {clone_flag_names(nstype)})")


def mount(
    source: bytes | None,
    target: bytes,
    fstype: bytes | None,
    flags: int = 0,
    data: bytes | None = None,
) -> None:
    def describe() -> str:
        args = f"src={_show(source)}, dst={_show(target)}, type={_show(fstype)}, flags={mount_flag_names(flags)}"
        return f"mount {args}, data={_show(data)}" if data else f"mount {args}"

    _check(_libc().mount(source, target, fstype, flags, data), describe)


def umount2(target: bytes, flags: int = 0) -> None:
    _check(_libc().umount2(target, flags), lambda: f"umount2({_show(target)}, {flags:#x})")


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    libc = _libc()
    rc = libc.syscall(ctypes.c_long(_syscall_number("pivot_root")), ctypes.c_char_p(new_root), ctypes.c_char_p(put_old))
    _check(rc, lambda: f"pivot_root({_show(new_root)}, {_show(put_old)})")


def sethostname(name: bytes) -> None:
    _check(_libc().sethostname(name, len(name)), lambda: f"sethostname({_show(name)})")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc().prctl(option, arg2, arg3, arg4, arg5), lambda: f"prctl({option}, {arg2})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@functools.cache
def _capset_arguments(
    effective: int, permitted: int, inheritable: int
) -> tuple[ctypes.c_long, _CapHeader, ctypes.Array[_CapData]]:
    # Built once (in P, before the forks that use them): a child only makes the call.
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for index in range(2):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    return ctypes.c_long(_syscall_number("capset")), header, data


def capset_prepare(effective: int, permitted: int, inheritable: int) -> None:
    """Build capset's arguments for these masks now (cached), not in a forked child."""
    _capset_arguments(effective, permitted, inheritable)


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (64-bit masks)."""
    number, header, data = _capset_arguments(effective, permitted, inheritable)
    rc = _libc().syscall(number, ctypes.byref(header), data)
    _check(rc, lambda: f"capset(effective={effective:#x})")


def keyctl(operation: int, arg2: int = 0, arg3: int = 0) -> int:
    """keyctl(2) with integer arguments (glibc does not wrap it); a NULL pointer is 0."""
    number = ctypes.c_long(_syscall_number("keyctl"))
    rc = _libc().syscall(number, ctypes.c_long(operation), ctypes.c_long(arg2), ctypes.c_long(arg3))
    name = _KEYCTL_NAMES.get(operation, str(operation))
    return _check(rc, lambda: f"keyctl({name}, {arg2 or 'NULL'}, {arg3})")


def set_interface_up(name: str) -> None:
    """Bring a network interface up with the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", name.encode(), 0)
        try:
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))
        except OSError as exc:
            raise OSError(
                exc.errno, f"ioctl(SIOCSIFFLAGS, {name}, IFF_UP): {exc.strerror} ({errno_name(exc.errno or 0)})"
            ) from None


def _rtattr(kind: int, data: bytes) -> bytes:
    length = _RTATTR.size + len(data)
    return _RTATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def add_address(ifname: str, family: int, address: str, prefixlen: int, scope: int = RT_SCOPE_UNIVERSE) -> None:
    """Add *address*/*prefixlen* to interface *ifname* (``ip address add``): one RTM_NEWADDR
    request on a NETLINK_ROUTE socket of the caller's network namespace, and its ack."""
    packed = socket.inet_pton(family, address)
    ifaddr = _IFADDRMSG.pack(family, prefixlen, IFA_F_NODAD, scope, socket.if_nametoindex(ifname))
    body = ifaddr + _rtattr(IFA_LOCAL, packed) + _rtattr(IFA_ADDRESS, packed)
    _rtnl_create(RTM_NEWADDR, body, lambda: f"RTM_NEWADDR {address}/{prefixlen} dev {ifname}")


def add_default_route(family: int, gateway: str) -> None:
    """The default route via *gateway* (``ip route add default via GATEWAY``), as add_address does."""
    route = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    body = route + _rtattr(RTA_GATEWAY, socket.inet_pton(family, gateway))
    _rtnl_create(RTM_NEWROUTE, body, lambda: f"RTM_NEWROUTE default via {gateway}")


def _rtnl_create(kind: int, body: bytes, describe: Callable[[], str]) -> None:
    """One create request on a NETLINK_ROUTE socket of the caller's network namespace; its ack."""
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.sendto(request, (0, 0))
        reply = sock.recv(4096)
    answer = _NLMSGHDR.unpack_from(reply)[1] if len(reply) >= _NLMSGHDR.size else None
    err = -_NLMSGERR.unpack_from(reply, _NLMSGHDR.size)[0] if answer == NLMSG_ERROR else errno.EPROTO
    if err:
        raise OSError(err, f"{describe()}: {os.strerror(err)} ({errno_name(err)})")


def _show(value: bytes | None) -> str:
    if value is None:
        return "NULL"
    return value.decode(errors="backslashreplace")
