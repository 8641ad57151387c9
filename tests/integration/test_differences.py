"""What is different inside a sandbox, inherently: each property the README's section "What is
different inside a sandbox" lists, as a test sees it (and, where there is one, the way back to the
host's behaviour)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.both_build_modes]


def test_each_listed_difference_holds(run_inner) -> None:
    result = run_inner(
        """
        import ctypes, errno, os, socket, uuid
        import pytest

        libc = ctypes.CDLL(None, use_errno=True)

        @pytest.fixture(scope="session")
        def pid_of_pytest():
            return os.getpid()  # taken in pytest's process, before the fork

        def errno_of(call, *args):
            return 0 if call(*args) == 0 else ctypes.get_errno()

        @pytest.mark.nsbox
        def test_a_new_pid_namespace(pid_of_pytest):
            assert os.getpid() != pid_of_pytest
            with pytest.raises(ProcessLookupError):
                os.kill(pid_of_pytest, 0)  # no such process inside (pids inside are small)
            assert open("/proc/1/comm").read().strip() != "systemd"  # PID 1 is the sandbox's

        @pytest.mark.nsbox
        def test_dockers_default_capabilities():
            name = b"other"
            assert errno_of(libc.sethostname, name, len(name)) == errno.EPERM  # no CAP_SYS_ADMIN
            assert socket.gethostname() == "nsbox"
            timeval = (ctypes.c_long * 2)(0, 0)
            assert errno_of(libc.settimeofday, timeval, None) == errno.EPERM  # no CAP_SYS_TIME
            open("/tmp/f", "w").close()
            with pytest.raises(PermissionError):
                os.setxattr("/tmp/f", "trusted.x", b"1")  # trusted.* needs CAP_SYS_ADMIN
            os.setxattr("/tmp/f", "user.x", b"1")  # user.* works

        @pytest.mark.nsbox(network="none")
        def test_network_none_has_only_loopback():
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            assert not os.path.exists("/sys/class/net/eth0")
            assert uuid.getnode() & (1 << 40)  # no MAC address: a random node id (multicast bit set)

        @pytest.mark.nsbox(network="host")
        def test_network_host_has_the_hosts_interfaces():
            assert len(socket.if_nameindex()) >= 1

        @pytest.mark.nsbox
        def test_a_minimal_dev():
            minimal = {"fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty"}
            minimal |= {"urandom", "zero"}
            assert set(os.listdir("/dev")) == minimal  # no block devices, no /dev/mem, no /dev/kmsg

        """
    )
    result.assert_outcomes(passed=5)
