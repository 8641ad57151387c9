"""The kernel's key retention service, for tests: add_key(2), request_key(2) and keyctl(2) by ctypes.

Importable as ``kernel_keys`` by the test files and by the inner pytest that ``run_inner`` starts
(and so inside its sandboxes: import it at the top of the inner test file). glibc wraps none of
these calls (libkeyutils does), so they go through syscall(2).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Final

# <asm/unistd_64.h> (x86_64), and aarch64's
_NUMBERS: Final = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}  # add_key, request_key, keyctl

# <linux/keyctl.h>
KEY_SPEC_THREAD_KEYRING: Final = -1
KEY_SPEC_PROCESS_KEYRING: Final = -2
KEY_SPEC_SESSION_KEYRING: Final = -3
KEY_SPEC_USER_KEYRING: Final = -4
KEY_SPEC_USER_SESSION_KEYRING: Final = -5
KEYCTL_GET_KEYRING_ID: Final = 0
KEYCTL_JOIN_SESSION_KEYRING: Final = 1
KEYCTL_DESCRIBE: Final = 6
KEYCTL_LINK: Final = 8
KEYCTL_SEARCH: Final = 10
KEYCTL_READ: Final = 11
KEYCTL_INVALIDATE: Final = 21
KEYCTL_GET_PERSISTENT: Final = 22

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _call(index: int, *args: object) -> int:
    number = _NUMBERS[os.uname().machine][index]
    rc = _libc.syscall(ctypes.c_long(number), *args)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{('add_key', 'request_key', 'keyctl')[index]}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
    return int(rc)


def keyctl(operation: int, *args: int | bytes | None) -> int:
    converted = [ctypes.c_long(a) if isinstance(a, int) else ctypes.c_char_p(a) for a in args]
    return _call(2, ctypes.c_int(operation), *converted)


def add_key(description: str, payload: bytes, keyring: int) -> int:
    """A key of type "user" in *keyring* (a serial or a KEY_SPEC_*); its serial."""
    return _call(0, b"user", description.encode(), payload, ctypes.c_size_t(len(payload)), ctypes.c_int(keyring))


def request_key(description: str) -> int:
    """Search the caller's keyrings (thread, process, session) for a "user" key; its serial."""
    return _call(1, b"user", description.encode(), None, ctypes.c_int(0))


def keyring_id(special: int, create: bool = False) -> int:
    return keyctl(KEYCTL_GET_KEYRING_ID, special, int(create))


def join_session_keyring() -> int:
    """Join a new anonymous session keyring (pam_keyinit's way of starting a session)."""
    return keyctl(KEYCTL_JOIN_SESSION_KEYRING, None)


def read(serial: int) -> bytes:
    """A key's payload, or a keyring's list of serials (packed int32s)."""
    size = keyctl(KEYCTL_READ, serial, None, 0)
    if size == 0:
        return b""  # (a keyring refuses a buffer whose size is no multiple of 4)
    buffer = ctypes.create_string_buffer(size)
    size = keyctl(KEYCTL_READ, serial, ctypes.addressof(buffer), len(buffer))
    return buffer.raw[: min(size, len(buffer))]


def keyring_contents(serial: int) -> list[int]:
    data = read(serial)
    return list(struct.unpack(f"{len(data) // 4}i", data))


def reachable(serial: int, seen: set[int] | None = None) -> set[int]:
    """Every key reachable from keyring *serial* (itself included), as `keyctl show` walks it."""
    seen = set() if seen is None else seen
    if serial in seen:
        return seen
    seen.add(serial)
    try:
        children = keyring_contents(serial) if describe(serial).startswith("keyring;") else []
    except OSError:
        children = []
    for child in children:
        reachable(child, seen)
    return seen


def describe(serial: int) -> str:
    """``type;uid;gid;perm;description``."""
    buffer = ctypes.create_string_buffer(4096)
    keyctl(KEYCTL_DESCRIBE, serial, ctypes.addressof(buffer), len(buffer))
    return buffer.value.decode()


def search(keyring: int, description: str) -> int:
    """Search *keyring* (recursively) for a "user" key; its serial."""
    return keyctl(KEYCTL_SEARCH, keyring, b"user", description.encode(), 0)


def link(serial: int, keyring: int) -> None:
    keyctl(KEYCTL_LINK, serial, keyring)


def invalidate(serial: int) -> None:
    keyctl(KEYCTL_INVALIDATE, serial)


# --- a seccomp filter that refuses the key calls (as Docker's default profile does) -------------

_AUDIT_ARCH: Final = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # <linux/audit.h>
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06  # <linux/bpf_common.h>
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000  # <linux/seccomp.h>
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def refuse_key_calls(err: int, *, only_join: bool = False) -> None:
    """Install a seccomp filter in the calling process (and so in every process it starts):
    add_key, request_key and keyctl fail with *err*; with *only_join*, only
    keyctl(KEYCTL_JOIN_SESSION_KEYRING, ...) does. For good: call it in a process of its own."""
    machine = os.uname().machine
    add, request, ctl = _NUMBERS[machine]
    refuse = (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | err)
    allow = (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)
    if only_join:
        program = [
            (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            (_BPF_JEQ_K, 0, 4, _AUDIT_ARCH[machine]),
            (_BPF_LD_W_ABS, 0, 0, 0),  # .nr
            (_BPF_JEQ_K, 0, 2, ctl),
            (_BPF_LD_W_ABS, 0, 0, 16),  # .args[0], low half (little-endian)
            (_BPF_JEQ_K, 1, 0, KEYCTL_JOIN_SESSION_KEYRING),
            allow,
            refuse,
        ]
    else:
        program = [
            (_BPF_LD_W_ABS, 0, 0, 4),
            (_BPF_JEQ_K, 0, 5, _AUDIT_ARCH[machine]),
            (_BPF_LD_W_ABS, 0, 0, 0),
            (_BPF_JEQ_K, 3, 0, add),
            (_BPF_JEQ_K, 2, 0, request),
            (_BPF_JEQ_K, 1, 0, ctl),
            allow,
            refuse,
        ]
    filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), filters)
    for option, arg2, arg3 in ((_PR_SET_NO_NEW_PRIVS, 1, 0), (_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))):
        if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({option}): {os.strerror(err)}")
