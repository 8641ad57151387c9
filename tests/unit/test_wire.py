"""Framing of records on the result pipe: tuples survive, garbage is refused, nothing unpickled."""

from __future__ import annotations

import os

import pytest

from pytest_nsbox.box import wire


def _decode(data: bytes) -> list[dict[str, object]]:
    return list(wire.Reader().feed(data))


def test_round_trip_keeps_tuples_and_reprs_the_rest() -> None:
    record = {"kind": "report", "location": ("t.py", 3, "test_x"), "nested": [("a", 1)], "odd": object}
    (decoded,) = _decode(wire.encode(record))
    assert decoded["location"] == ("t.py", 3, "test_x")
    assert decoded["nested"] == [("a", 1)]
    assert decoded["odd"] == repr(object)


def test_incremental_feed_across_chunks() -> None:
    data = wire.encode({"kind": "a"}) + wire.encode({"kind": "b", "x": "y" * 100000})
    reader = wire.Reader()
    got = []
    for start in range(0, len(data), 7):
        got.extend(reader.feed(data[start : start + 7]))
    assert [r["kind"] for r in got] == ["a", "b"] and reader.pending == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ((100 * 2**20).to_bytes(4, "big"), "exceeds the limit"),
        ((5).to_bytes(4, "big") + b"nope!", "undecodable record"),
        ((2).to_bytes(4, "big") + b"[]", "record without a kind"),
        ((11).to_bytes(4, "big") + b'{"kind": 3}', "record without a kind"),
    ],
)
def test_hostile_bytes_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        _decode(data)


def test_truncated_frame_is_pending() -> None:
    reader = wire.Reader()
    assert list(reader.feed(wire.encode({"kind": "a"})[:-1])) == []
    assert reader.pending > 0


def test_send_writes_whole_records_through_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        wire.send(write_fd, {"kind": "small"})
        os.close(write_fd)
        data = b""
        while chunk := os.read(read_fd, 65536):
            data += chunk
        assert _decode(data) == [{"kind": "small"}]
    finally:
        os.close(read_fd)


def test_kept_descriptors_never_include_files_of_excluded_devices(tmp_path) -> None:
    import os

    from pytest_nsbox.box.steps import kept_descriptors

    path = tmp_path / "counter"
    path.write_text("0\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fd in kept_descriptors({0, 1, 2})  # a regular file: pytest's capture files are such
        assert fd not in kept_descriptors({0, 1, 2}, frozenset({os.fstat(fd).st_dev}))
    finally:
        os.close(fd)
