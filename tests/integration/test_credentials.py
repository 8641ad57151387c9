"""Nothing of the host's credentials crosses: keyrings, kernel interfaces of /proc and /sys, chosen variables."""

from __future__ import annotations

import os
import platform
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.needs_userns,
    pytest.mark.needs_overlay_userns,
    pytest.mark.both_build_modes,
    # kernel_keys knows these machines' syscall numbers (as pytest_nsbox.box._linux does)
    pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="keyctl(2) by number: x86_64 and aarch64"),
]

KEYRING_CONFTEST = """
import os
import kernel_keys as K

def pytest_configure(config):
    # pytest's process starts a session as pam_keyinit does: a session keyring of its own, the
    # user keyring linked into it; then a key in each
    K.join_session_keyring()
    K.link(K.keyring_id(K.KEY_SPEC_USER_KEYRING, create=True), K.KEY_SPEC_SESSION_KEYRING)
    session = K.add_key("nsbox-session-{token}", b"session secret", K.KEY_SPEC_SESSION_KEYRING)
    user = K.add_key("nsbox-user-{token}", b"user secret", K.KEY_SPEC_USER_KEYRING)
    assert K.read(session) == b"session secret" and K.request_key("nsbox-user-{token}") == user
    config._nsbox_keys = (session, user)
    os.environ["NSBOX_TEST_KEYS"] = f"{{session}} {{user}} {{K.keyring_id(K.KEY_SPEC_SESSION_KEYRING)}}"

def pytest_unconfigure(config):
    for serial in getattr(config, "_nsbox_keys", ()):
        K.invalidate(serial)  # the user keyring outlives this process
"""


def test_keyrings_of_pytest_are_out_of_reach(run_inner) -> None:
    token = uuid.uuid4().hex
    result = run_inner(
        f"""
        import errno, os, pytest
        import kernel_keys as K

        def refused(call, *args):
            with pytest.raises(OSError) as exc:
                call(*args)
            return exc.value.errno

        @pytest.mark.nsbox
        def test_keys():
            session, user, pytest_session = map(int, os.environ["NSBOX_TEST_KEYS"].split())
            # a session keyring of the sandbox's own, empty
            own = K.keyring_id(K.KEY_SPEC_SESSION_KEYRING)
            assert own != pytest_session and K.keyring_contents(own) == []
            for keyring in (K.KEY_SPEC_SESSION_KEYRING, K.KEY_SPEC_USER_KEYRING, K.KEY_SPEC_USER_SESSION_KEYRING):
                assert not {{session, user}} & K.reachable(K.keyring_id(keyring, create=True))
            for description in ("nsbox-session-{token}", "nsbox-user-{token}"):
                assert refused(K.request_key, description) == errno.ENOKEY
                for keyring in (K.KEY_SPEC_USER_KEYRING, K.KEY_SPEC_USER_SESSION_KEYRING):
                    assert refused(K.search, keyring, description) == errno.ENOKEY
            # not possessed any more: their serials give nothing to read (a key's user permissions,
            # "view" by default, still apply, as to any process of this user)
            assert refused(K.read, session) == errno.EACCES
            assert refused(K.read, user) == errno.EACCES
            assert "{token}" not in open("/proc/keys").read()
            # the sandbox's keyrings work as keyrings
            mine = K.add_key("mine", b"test's own", K.KEY_SPEC_SESSION_KEYRING)
            assert K.read(mine) == b"test's own" and K.request_key("mine") == mine
            pid = os.fork()
            if pid == 0:  # a child of the test has the test's session keyring
                os._exit(0 if K.request_key("mine") == mine else 1)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        """,
        conftest=KEYRING_CONFTEST.format(token=token),
    )
    result.assert_outcomes(passed=1)
    assert token not in open("/proc/keys").read()  # the keys were invalidated


# runc's and Docker's maskedPaths and readonlyPaths (/proc/sys: test_isolation), and /proc/kmsg
MASKED = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/kmsg",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger")
KERNEL_PATHS = (*MASKED, *READ_ONLY)


@pytest.mark.parametrize(("image", "network"), [("host", "none"), ("host", "host"), ("tiny", "none")])
def test_kernel_interfaces_are_masked_or_read_only(run_inner, tiny_image: Path, image: str, network: str) -> None:
    present = [path for path in KERNEL_PATHS if os.path.lexists(path)]
    missing = [path for path in KERNEL_PATHS if not os.path.lexists(path)]
    assert "/proc/keys" in present and "/proc/timer_list" in present and "/sys/firmware" in present
    result = run_inner(
        f"""
        import errno, os, stat, pytest

        MASKED = {[p for p in present if p in MASKED]!r}
        READ_ONLY = {[p for p in present if p in READ_ONLY]!r}
        MISSING = {missing!r}

        def write_error(path):
            with pytest.raises(OSError) as exc:  # opened, never written: as root, old code would write
                if os.path.isdir(path):
                    os.close(os.open(os.path.join(path, "nsbox-x"), os.O_WRONLY | os.O_CREAT, 0o600))
                else:
                    os.close(os.open(path, os.O_WRONLY))
            return exc.value.errno

        def owner_writable(path):
            # the path, or the first file below it whose owner may write it
            if not os.path.isdir(path):
                return path
            for directory, _, files in os.walk(path):
                for name in files:
                    if os.lstat(os.path.join(directory, name)).st_mode & stat.S_IWUSR:
                        return os.path.join(directory, name)
            return None

        @pytest.mark.nsbox(image={str(tiny_image) if image == "tiny" else image!r}, network={network!r})
        def test_masked():
            for path in MASKED:
                assert os.statvfs(path).f_flag & os.ST_RDONLY, path
                if os.path.isdir(path):
                    assert os.listdir(path) == [], path
                else:
                    assert open(path, "rb").read() == b"", path
                assert write_error(path) == errno.EROFS, path
            # no cgroup hierarchy: an empty read-only directory (network="none": of a fresh sysfs)
            assert os.listdir("/sys/fs/cgroup") == [] and os.statvfs("/sys/fs/cgroup").f_flag & os.ST_RDONLY
            assert write_error("/sys/fs/cgroup") in (errno.EROFS, errno.ENOENT)
            for path in READ_ONLY:
                assert os.statvfs(path).f_flag & os.ST_RDONLY, path
                writable = owner_writable(path)
                if writable:  # as root, old code could write it: EACCES rootless (the owner is not mapped)
                    assert write_error(writable) in (errno.EROFS, errno.EACCES), writable
            for path in MISSING:  # skipped, not made up
                assert not os.path.lexists(path), path
            assert open("/proc/sys/kernel/hostname").read() == "nsbox\\n"  # /proc itself is the sandbox's
        """
    )
    result.assert_outcomes(passed=1)


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Variables in the environment the inner pytest starts with (so also in its exec-time block)."""
    values = {
        "NSBOX_TEST_TOKEN": f"token-{uuid.uuid4().hex}",
        "AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}",
        "NSBOX_TEST_KEPT": f"kept-{uuid.uuid4().hex}",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


ENV_PROBE = """
import ctypes, os, posix, subprocess, sys
import pytest
from pytest_nsbox import nsbox

SECRETS = {secrets!r}

def seen():
    \"\"\"Which secret values the test can find: its environment, its children's, every /proc/*/environ.\"\"\"
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    found = set()
    for name, value in SECRETS.items():
        if os.environ.get(name) == value or posix.environ.get(name.encode()) == value.encode():
            found.add(name + " in os.environ")
        if libc.getenv(name.encode()) is not None:
            found.add(name + " in getenv(3)")
    child = subprocess.run([sys.executable, "-c", "import os; print(dict(os.environ))"], capture_output=True, text=True).stdout
    environs = {{}}
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            environs[pid] = open(f"/proc/{{pid}}/environ", "rb").read()
        except OSError:
            pass  # gone
    for name, value in SECRETS.items():
        if value in child:
            found.add(name + " in a subprocess")
        for pid, data in environs.items():
            if value.encode() in data:
                found.add(name + " in /proc/" + ("self" if int(pid) == os.getpid() else pid) + "/environ")
    return found
"""


def test_drop_env_from_the_ini_and_the_marker(run_inner, pytester: pytest.Pytester, secrets: dict[str, str]) -> None:
    pytester.makeini("[pytest]\nnsbox_drop_env =\n    *_TOKEN\n    AWS_*\n")
    result = run_inner(
        ENV_PROBE.format(secrets=secrets)
        + """
P_PID = os.getpid()  # at import: pytest's own process

@nsbox
def test_ini_patterns():
    assert seen() == {"NSBOX_TEST_KEPT in os.environ", "NSBOX_TEST_KEPT in getenv(3)", "NSBOX_TEST_KEPT in a subprocess",
                      "NSBOX_TEST_KEPT in /proc/self/environ"}
    assert open("/proc/1/environ", "rb").read().strip(b"\\0") == b""  # PID 1 shows nothing of pytest's

@nsbox(drop_env="NSBOX_TEST_KEPT")
def test_the_marker_replaces_the_ini():
    names = {entry.split()[0] for entry in seen()}
    assert names == {"NSBOX_TEST_TOKEN", "AWS_SECRET_ACCESS_KEY"}

@nsbox(drop_env=None)
def test_none_drops_nothing():
    assert {entry.split()[0] for entry in seen()} == set(SECRETS)

def test_not_sandboxed_keeps_everything():
    assert all(os.environ[name] == value for name, value in SECRETS.items())
""",
        "--nsbox-memory-report=0",
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*drop_env=*_TOKEN AWS_* (ini)*"])  # the header


def test_drop_env_is_off_by_default_and_pytests_environ_is_out_of_sight(run_inner, secrets: dict[str, str]) -> None:
    result = run_inner(
        ENV_PROBE.format(secrets=secrets)
        + """
P_PID = os.getpid()  # at import: pytest's own process

@nsbox
def test_default():
    found = seen()
    # nothing dropped: the test's own environment is pytest's (and so is its exec-time block)
    assert {entry.split()[0] for entry in found} == set(SECRETS)
    assert {entry.split(" in ")[1] for entry in found} == {"os.environ", "getenv(3)", "a subprocess", "/proc/self/environ"}
    # pytest's process is outside the sandbox's PID namespace: /proc shows the sandbox's PID 1
    # and the test, and PID 1's environment is empty
    assert {int(p) for p in os.listdir("/proc") if p.isdigit()} == {1, os.getpid()}
    assert P_PID not in (1, os.getpid()) and not os.path.exists(f"/proc/{P_PID}")
    assert open("/proc/1/environ", "rb").read().strip(b"\\0") == b""
"""
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("marker", "shown"),
    [
        ("drop_env=['A=B']", "invalid drop_env *'A=B'* from nsbox marker on test_inner.py::test_bad*no blank, no '='*"),
        ("drop_env=5", "invalid drop_env 5 from nsbox marker on test_inner.py::test_bad*expected a pattern or a list*"),
        ("drop_env=['']", "invalid drop_env *''* from nsbox marker on test_inner.py::test_bad*cannot name a variable*"),
        ("drop_envs=['X']", "*'drop_envs' (did you mean 'drop_env'?)*"),
    ],
)
def test_bad_drop_env_is_an_error_naming_the_test(run_inner, marker: str, shown: str) -> None:
    result = run_inner(
        f"""
        import pytest

        @pytest.mark.nsbox({marker})
        def test_bad():
            raise AssertionError("the body never runs")
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{shown}"])


def test_bad_drop_env_in_the_ini_is_a_usage_error(run_inner, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_drop_env =\n    GOOD_*\n    BAD=1\n")
    result = run_inner("def test_x():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid drop_env *'GOOD_*', 'BAD=1'* from ini nsbox_drop_env*"])


REFUSING_CONFTEST = """
import errno
import kernel_keys as K

def pytest_configure(config):
    K.refuse_key_calls(errno.{err}, only_join={only_join})  # pytest's process and all it starts
"""


def test_without_keyrings_a_sandbox_is_built_all_the_same(run_inner) -> None:
    """keyctl refused altogether (a kernel without keyrings, Docker's seccomp profile): there is no
    keyring to leave, and none the test could reach."""
    result = run_inner(
        """
        import errno, pytest
        import kernel_keys as K

        @pytest.mark.nsbox
        def test_no_keyrings():
            with pytest.raises(OSError) as exc:
                K.keyring_id(K.KEY_SPEC_SESSION_KEYRING)
            assert exc.value.errno == errno.ENOSYS
        """,
        "--nsbox-require",
        conftest=REFUSING_CONFTEST.format(err="ENOSYS", only_join=False),
    )
    result.assert_outcomes(passed=1)


def test_a_session_keyring_that_cannot_be_left_fails_closed(run_inner) -> None:
    """Joining refused while pytest's session keyring stays reachable: no sandbox, a setup error naming the step."""
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_never_runs():
            raise AssertionError("ran with pytest's session keyring")
        """,
        conftest=REFUSING_CONFTEST.format(err="EPERM", only_join=True),
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*join_session_keyring*KEYCTL_JOIN_SESSION_KEYRING*not permitted (EPERM). Hint: *the test would keep pytest's*"]
    )
