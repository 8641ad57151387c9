"""A marked test runs in fresh namespaces over a throwaway overlay; the host never sees its changes."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.both_build_modes]


@pytest.fixture
def canary() -> object:
    """A directory of files on the host, in the caller's home (overlaid also when rootless), removed afterwards."""
    path = Path(pwd.getpwuid(os.getuid()).pw_dir) / f".nsbox-canary-{uuid.uuid4().hex}"  # not $HOME: pytester moves it
    path.mkdir()
    for index in range(3):
        (path / f"file{index}").write_text(f"canary {index}\n")
    yield path
    shutil.rmtree(path)


def test_destructive_test_is_contained(run_inner, canary: Path) -> None:
    result = run_inner(
        f"""
        import os, shutil, pytest, pytest_nsbox

        @pytest.mark.nsbox
        def test_destroy():
            pytest_nsbox.require_sandbox()          # fail closed before deleting anything
            shutil.rmtree({str(canary)!r})
            assert not os.path.exists({str(canary)!r})
            os.mkdir({str(canary)!r} + "-created")
        """
    )
    result.assert_outcomes(passed=1)
    assert sorted(p.name for p in canary.iterdir()) == ["file0", "file1", "file2"]
    assert not Path(f"{canary}-created").exists()


@pytest.mark.needs_root
def test_writes_to_etc_and_usr_are_discarded(run_inner) -> None:
    token = uuid.uuid4().hex
    result = run_inner(
        f"""
        import os, pytest, pytest_nsbox

        @pytest.mark.nsbox
        def test_write_system():
            pytest_nsbox.require_sandbox()
            with open("/etc/hostname", "w") as f:
                f.write("overwritten")
            open("/etc/nsbox-{token}", "w").write("x")
            os.makedirs("/usr/share/nsbox-{token}")
            assert open("/etc/hostname").read() == "overwritten"
        """
    )
    result.assert_outcomes(passed=1)
    assert not Path(f"/etc/nsbox-{token}").exists()
    assert not Path(f"/usr/share/nsbox-{token}").exists()
    assert Path("/etc/hostname").read_text() != "overwritten"


def test_sees_fresh_namespaces_and_init_layer(run_inner) -> None:
    host_ns = {ns: os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("mnt", "pid", "net", "user", "uts", "ipc", "cgroup")}
    result = run_inner(
        f"""
        import os, socket, pytest

        HOST_NS = {host_ns!r}

        @pytest.mark.nsbox
        def test_namespaces():
            for ns, inode in HOST_NS.items():
                assert os.stat(f"/proc/self/ns/{{ns}}").st_ino != inode, ns
            assert socket.gethostname() == "nsbox"
            assert open("/etc/hostname").read() == "nsbox\\n"
            assert "127.0.1.1\\tnsbox" in open("/etc/hosts").read()
            assert os.getuid() == 0          # root inside, mapped to the invoking uid outside
            assert os.getpid() > 1           # the test is never PID 1
            assert open("/proc/1/comm").read().strip().startswith("python")
            assert "NoNewPrivs:\\t1" in open("/proc/self/status").read()
        """
    )
    result.assert_outcomes(passed=1)


def test_filesystem_layout(run_inner, tmp_path_factory: pytest.TempPathFactory) -> None:
    hidden = Path(tempfile.gettempdir()) / f"nsbox-hidden-{uuid.uuid4().hex}"
    hidden.write_text("host /tmp content")
    try:
        _check_layout(run_inner, hidden)
    finally:
        hidden.unlink()


def _check_layout(run_inner, hidden: Path) -> None:
    result = run_inner(
        """
        import errno, os, pytest

        @pytest.mark.nsbox
        def test_layout(tmp_path):
            assert sorted(os.listdir("/dev")) == [
                "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
                "urandom", "zero"]
            with open("/dev/null", "w") as f:
                f.write("x")
            assert len(open("/dev/urandom", "rb").read(16)) == 16
            # a fresh /tmp: host files are not there (only paths bound in, like basetemp)
            assert "HIDDEN" not in os.listdir("/tmp")
            for path in ("/proc/sys/kernel/hostname", "/sys/kernel/mm"):
                with pytest.raises(OSError) as exc:
                    open(path if path.startswith("/proc") else path + "/nsbox-x", "w").write("x")
                assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), path
            (tmp_path / "out.txt").write_text("tmp_path works")
            open("/dev/shm/x", "w").write("shm works")
            open("/tmp/x", "w").write("tmp works")
        """.replace("HIDDEN", hidden.name)
    )
    result.assert_outcomes(passed=1)


def test_cannot_undo_mounts(run_inner) -> None:
    """CAP_SYS_ADMIN is dropped: the read-only binds cannot be re-mounted read-write."""
    result = run_inner(
        """
        import ctypes, errno, os, pytest

        @pytest.mark.nsbox
        def test_remount():
            libc = ctypes.CDLL(None, use_errno=True)
            MS_REMOUNT, MS_BIND = 0x20, 0x1000
            rc = libc.mount(None, os.getcwd().encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None)
            assert rc == -1 and ctypes.get_errno() == errno.EPERM
            rc = libc.mount(b"tmpfs", b"/mnt", b"tmpfs", ctypes.c_ulong(0), None)
            assert rc == -1 and ctypes.get_errno() == errno.EPERM
            assert libc.umount2(b"/tmp", 2) == -1
        """
    )
    result.assert_outcomes(passed=1)


def test_rootfs_directory_image(run_inner, tiny_image: Path) -> None:
    result = run_inner(
        f"""
        import os, pytest
        from pytest_nsbox import nsbox

        @nsbox(image={str(tiny_image)!r})
        def test_in_tiny():
            assert "nsbox-tiny" in open("/etc/os-release").read()
            assert open("/usr/share/tiny/data.txt").read() == "lower layer file\\n"
            assert not os.path.exists("/usr/bin/apt")           # not the host's /usr
            os.remove("/usr/share/tiny/data.txt")              # a whiteout in the upper layer
            assert not os.path.exists("/usr/share/tiny/data.txt")
            import json, decimal                               # imports still work after pivot_root
        """
    )
    result.assert_outcomes(passed=1)
    assert (tiny_image / "usr/share/tiny/data.txt").read_text() == "lower layer file\n"


def test_the_sandbox_init_has_no_privileges_to_lend(run_inner) -> None:
    """PID 1 runs as the test's user in the test's user namespace, so the test may ptrace it: it
    keeps no capabilities, none in its bounding set, and no_new_privs, so it has nothing to lend."""
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_init():
            status = dict(line.split(":", 1) for line in open("/proc/1/status").read().splitlines())
            for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[field], 16) == 0, field
            assert status["NoNewPrivs"].strip() == "1"
        """
    )
    result.assert_outcomes(passed=1)


def test_inherited_descriptors_are_closed(run_inner) -> None:
    result = run_inner(
        """
        import os, socket, pytest

        @pytest.fixture(scope="session")
        def host_handles():
            dir_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)  # setns() into the host's network
            yield dir_fd, sock.fileno(), ns_fd
            os.close(ns_fd)
            sock.close()
            os.close(dir_fd)

        @pytest.mark.nsbox(memory="256M")
        def test_no_escape(host_handles):
            for fd in host_handles:
                with pytest.raises(OSError):
                    os.fstat(fd)

        @pytest.mark.nsbox(memory="256M")
        @pytest.mark.parametrize("n", range(3))
        def test_no_cgroup_file(n):
            # pytest's process keeps the counters of sandbox cgroups open: none reaches a sandbox
            # (through /proc/self/fd a test could reopen e.g. memory.oom_control for writing)
            for name in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{name}")
                except OSError:
                    continue
                assert "memory." not in target and "pids." not in target, target
        """
    )
    result.assert_outcomes(passed=4)


def test_network_none_has_only_loopback(run_inner) -> None:
    result = run_inner(
        """
        import errno, socket, threading, pytest

        @pytest.mark.nsbox(network="none")
        def test_loopback_only():
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            server = socket.create_server(("127.0.0.1", 0))
            port = server.getsockname()[1]
            threading.Thread(target=lambda: server.accept()[0].sendall(b"hi"), daemon=True).start()
            assert socket.create_connection(("127.0.0.1", port), timeout=5).recv(2) == b"hi"
            with pytest.raises(OSError) as exc:
                socket.create_connection(("192.0.2.1", 9), timeout=2)   # TEST-NET-1: never routed
            assert exc.value.errno == errno.ENETUNREACH
        """
    )
    result.assert_outcomes(passed=1)


def test_network_host_shares_the_hosts_namespace(run_inner) -> None:
    host_net = os.stat("/proc/self/ns/net").st_ino
    result = run_inner(
        f"""
        import os, pytest

        @pytest.mark.nsbox(network="host")
        def test_host_net():
            assert os.stat("/proc/self/ns/net").st_ino == {host_net}
        """
    )
    result.assert_outcomes(passed=1)


def test_require_sandbox_refuses_outside() -> None:
    import pytest_nsbox

    with pytest.raises(RuntimeError, match="not inside an nsbox sandbox"):
        pytest_nsbox.require_sandbox()
