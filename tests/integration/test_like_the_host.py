"""A sandboxed test sees the machine it runs on: name resolution, /etc/hosts, the garbage collector."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import bound_by_create_server, hosts_lookups, resolve_localhost

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.both_build_modes]


def test_network_none_resolves_and_binds_localhost_as_the_host_does(run_inner) -> None:
    expected = resolve_localhost()
    assert expected["AF_INET AI_ADDRCONFIG"] is not None  # the case that failed in a sandbox
    result = run_inner(
        f"""
        import errno, socket, pytest
        from helpers import bound_by_create_server, resolve_localhost

        @pytest.mark.nsbox(network="none")
        def test_localhost():
            assert resolve_localhost() == {expected!r}
            assert bound_by_create_server("localhost") == {bound_by_create_server("localhost")!r}

        @pytest.mark.nsbox(network="none")
        def test_still_no_way_out():
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            for family, address in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::2")):
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    with pytest.raises(OSError) as exc:
                        sock.connect((address, 9))
                    assert exc.value.errno == errno.ENETUNREACH, address
        """
    )
    result.assert_outcomes(passed=2)


def test_image_host_resolves_every_line_of_the_hosts_etc_hosts_as_the_host_does(run_inner) -> None:
    hosts = Path("/etc/hosts").read_text()
    expected = hosts_lookups(hosts)
    assert expected, "the host's /etc/hosts names nothing"
    result = run_inner(
        f"""
        import socket, pytest
        from helpers import hosts_lookups

        @pytest.mark.nsbox(image="host")
        def test_hosts():
            assert hosts_lookups({hosts!r}) == {expected!r}
            assert socket.gethostbyname(socket.gethostname()) == "127.0.1.1"   # the sandbox's own name
        """
    )
    result.assert_outcomes(passed=1)


def test_directory_image_keeps_its_own_etc_hosts(run_inner, tiny_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "nsswitch.conf").write_text("hosts: files\n")
    (image / "etc" / "hosts").write_text("127.0.0.1 localhost\n192.0.2.77 only-in-this-image\n")
    result = run_inner(
        f"""
        import socket
        from pytest_nsbox import nsbox

        @nsbox(image={str(image)!r})
        def test_own_hosts():
            text = open("/etc/hosts").read()
            assert text == "127.0.0.1 localhost\\n192.0.2.77 only-in-this-image\\n127.0.1.1\\tnsbox\\n"
            assert socket.gethostbyname("only-in-this-image") == "192.0.2.77"

        @nsbox(image={str(tiny_image)!r})
        def test_generated_for_an_image_without_one():
            assert "127.0.1.1\\tnsbox" in open("/etc/hosts").read()
        """
    )
    result.assert_outcomes(passed=2)


GC_CONFTEST = """
import gc

IN_P = {}

def pytest_configure(config):
    if config.getoption("-k") == "user_freeze":
        gc.freeze()  # the user's own (e.g. before forking workers): the test sees it as it is

def pytest_runtest_logstart(nodeid):
    IN_P.update(frozen=gc.get_freeze_count(), enabled=gc.isenabled())  # in pytest's process, before the fork
"""

GC_TESTS = """
import gc, weakref, pytest
from conftest import IN_P

class Node:
    pass

CYCLE = Node()
CYCLE.self = CYCLE                      # made at collection, in pytest's process
GONE = weakref.ref(CYCLE)
HOLDER = [Node()]

@pytest.mark.nsbox
def test_no_freeze():
    assert IN_P["frozen"] == 0 and gc.get_freeze_count() == 0 and gc.isenabled()
    assert any(referrer is HOLDER for referrer in gc.get_referrers(HOLDER[0]))
    global CYCLE
    del CYCLE
    gc.collect()
    assert GONE() is None               # the inherited heap is collected too

@pytest.mark.nsbox
def test_user_freeze():
    # frozen objects only die between the hook and the fork: nothing is frozen but the user's
    assert 0 < gc.get_freeze_count() <= IN_P["frozen"]
"""


def test_the_test_sees_the_garbage_collector_of_an_unsandboxed_test(run_inner) -> None:
    run_inner(GC_TESTS, "-k", "no_freeze", conftest=GC_CONFTEST).assert_outcomes(passed=1, deselected=1)
    run_inner(GC_TESTS, "-k", "user_freeze", conftest=GC_CONFTEST).assert_outcomes(passed=1, deselected=1)


def test_a_disabled_collector_stays_disabled(run_inner) -> None:
    result = run_inner(
        """
        import gc, pytest

        @pytest.fixture(scope="session", autouse=True)
        def no_collector():                     # runs in pytest's process, before the sandbox
            gc.disable()
            yield
            gc.enable()

        @pytest.mark.nsbox
        def test_sandboxed():
            assert not gc.isenabled()
        """
    )
    result.assert_outcomes(passed=1)


def test_readdir_and_stat_agree_on_inode_numbers(run_inner) -> None:
    """overlayfs with xino: the inode number os.scandir() gives is the one os.stat() gives, for
    files and directories of the image and of the writable layer (mount points aside: there,
    readdir names the directory below the mount, on the host too)."""
    result = run_inner(
        """
        import os
        import pytest

        def mismatches(directory):
            mounts = {line.split()[4] for line in open("/proc/self/mountinfo")}
            return [
                (entry.path, entry.inode(), os.stat(entry.path, follow_symlinks=False).st_ino)
                for entry in os.scandir(directory)
                if entry.path not in mounts and entry.inode() != os.stat(entry.path, follow_symlinks=False).st_ino
            ]

        @pytest.mark.nsbox
        def test_host_image():
            # new and copied-up entries where a sandbox can write also rootless: the cwd's overlay
            os.mkdir("new-dir")
            open("new-file", "w").close()
            open("test_inner.py", "a").close()  # an old file, copied up
            os.mkdir("new-dir/below")
            for directory in (os.getcwd(), "new-dir", "/etc", "/usr/lib", "/usr", "/"):
                assert not mismatches(directory), directory

        @pytest.mark.nsbox(image="busybox")
        def test_busybox_image():
            os.mkdir("/etc/new-dir")
            open("/etc/new-file", "w").close()
            open("/etc/passwd", "a").close()
            for directory in ("/etc", "/bin", "/"):
                assert not mismatches(directory), directory
        """
    )
    result.assert_outcomes(passed=2)
