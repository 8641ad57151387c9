"""hypothesis: a failure found in a sandbox is in the example database the next run replays.

Each scenario runs plain and with ``--nsbox-all`` against a database of its own and must go the
same way. The database lives in the home directory: a sandbox sees it through a throwaway overlay
(as it sees the rootdir, wherever it lives), so only what pytest-nsbox carries back reaches the host.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nsbox import examples_db

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

CONFTEST = """
import os
from hypothesis import Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

database = DirectoryBasedExampleDatabase(os.environ["NSBOX_TEST_DB"])
settings.register_profile("db", database=database)
settings.register_profile("replay-only", database=database, phases=[Phase.explicit, Phase.reuse])
settings.load_profile("db")
"""

PROPERTY = """
import os
from hypothesis import given, strategies as st

@given(st.integers())
def test_below_limit(x):
    assert x < int(os.environ.get("LIMIT", "1000"))
"""


@pytest.fixture
def database_dir() -> Iterator[Path]:
    home_cache = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache"  # pytester sets HOME to its own dir
    home_cache.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="pytest-nsbox-test-db-", dir=home_cache))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["plain", "sandboxed"])
def test_failure_found_is_replayed_next_run(
    run_inner, monkeypatch: pytest.MonkeyPatch, database_dir: Path, mode: str
) -> None:
    monkeypatch.setenv("NSBOX_TEST_DB", str(database_dir))
    extra = ("--nsbox-all",) if mode == "sandboxed" else ()

    def run(*args: str) -> pytest.RunResult:
        return run_inner(PROPERTY, "-p", "no:randomly", *extra, *args, conftest=CONFTEST)

    found = run()
    found.assert_outcomes(failed=1)
    found.stdout.fnmatch_lines(["*x=1000,*"])
    assert examples_db.entries(str(database_dir)), "nothing reached the host's database"

    # Only replay what the database holds: the same minimal failure, with no search.
    replayed = run("--hypothesis-profile=replay-only")
    replayed.assert_outcomes(failed=1)
    replayed.stdout.fnmatch_lines(["*x=1000,*"])

    # Fixed: the replayed example passes, and hypothesis deletes it from the database.
    before_fix = examples_db.entries(str(database_dir))
    monkeypatch.setenv("LIMIT", str(10**30))
    run("--hypothesis-profile=replay-only").assert_outcomes(passed=1)
    assert examples_db.entries(str(database_dir)) < before_fix, "the deletions did not reach the host's database"
    monkeypatch.delenv("LIMIT")
    run("--hypothesis-profile=replay-only").assert_outcomes(skipped=1)  # nothing is left to replay: no example ran


FORGED = """
import base64, os
import pytest
from hypothesis import given, strategies as st
from pytest_nsbox import runtest

DB = os.environ["NSBOX_TEST_DB"]
ENTRY = "0123456789abcdef/0123456789abcdef"

CONFIG = []

@pytest.fixture(autouse=True)
def sandboxed_config(request):
    CONFIG[:] = [request.config]

def forge(value):  # what a hostile test can send: its own records on the result pipe
    runtest.child_channel(CONFIG[0]).send("carry", name="hypothesis", value=value)

@given(st.just(0))
def test_forges(x):
    data = base64.b64encode(b"planted").decode()
    forge([{{"dir": {outside!r}, "saved": [[ENTRY, data]], "deleted": []}}])
    forge([{{"dir": DB, "saved": [["../../../" + ENTRY, data]], "deleted": []}}])
    forge([{{"dir": DB, "saved": [["fedcba9876543210/0123456789abcdef", data]], "deleted": []}}])
    forge([{{"dir": DB, "saved": [[ENTRY, base64.b64encode(bytes({size})).decode()]], "deleted": []}}])
"""


def test_forged_changes_are_refused(run_inner, monkeypatch: pytest.MonkeyPatch, database_dir: Path, tmp_path: Path) -> None:
    """The test process may send anything: P writes inside the test's own database only, never
    through a symlink, never more than the caps."""
    monkeypatch.setenv("NSBOX_TEST_DB", str(database_dir))
    outside = tmp_path / "outside"
    outside.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (database_dir / "fedcba9876543210").symlink_to(elsewhere)
    source = FORGED.format(outside=str(outside), size=examples_db.MAX_VALUE_BYTES + 1)
    result = run_inner(source, "-p", "no:randomly", "--nsbox-all", "-W", "always", conftest=CONFTEST)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*state from the sandbox was not carried back: hypothesis: *"])
    assert list(outside.iterdir()) == [] and list(elsewhere.iterdir()) == []
    assert not (database_dir / "0123456789abcdef").exists()
    assert sorted(p.name for p in database_dir.iterdir()) == ["fedcba9876543210"]
