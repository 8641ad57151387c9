"""Framing of the records that cross the fork on the result pipe.

A record is a JSON object with a ``kind``. Frames are a 4-byte big-endian length and the
UTF-8 JSON. Tuples survive the trip (pytest reports hold tuples); values JSON cannot hold
become their ``repr``. The reader trusts nothing: the test process holds the write end, so a
frame may be truncated, oversized or garbage, and never reaches ``pickle``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any, Final

from ..errors import NsboxError

MAX_RECORD_BYTES: Final = 64 * 2**20
_HEADER: Final = struct.Struct(">I")
_TUPLE_TAG: Final = "__nsbox_tuple__"


class WireError(NsboxError):
    """The byte stream on the result pipe is not a valid sequence of records."""


def _tag_tuples(value: Any) -> Any:
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_tag_tuples(v) for v in value]}
    if isinstance(value, list):
        return [_tag_tuples(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _tag_tuples(v) for k, v in value.items()}
    return value


def _untag_tuples(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _TUPLE_TAG in obj:
        return tuple(obj[_TUPLE_TAG])
    return obj


def encode(record: dict[str, Any]) -> bytes:
    """One frame for *record*."""
    payload = json.dumps(_tag_tuples(record), default=repr, separators=(",", ":")).encode()
    return _HEADER.pack(len(payload)) + payload


def send(fd: int, record: dict[str, Any]) -> None:
    """Write one record; a short write is retried (pipes are written whole up to PIPE_BUF only)."""
    data = memoryview(encode(record))
    while data:
        written = os.write(fd, data)
        data = data[written:]


class Reader:
    """Incremental decoder: feed bytes, take complete records."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_RECORD_BYTES:
                raise WireError(f"record of {length} bytes exceeds the limit of {MAX_RECORD_BYTES}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                record = json.loads(payload, object_hook=_untag_tuples)
            except ValueError as exc:
                raise WireError(f"undecodable record: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                raise WireError(f"record without a kind: {payload[:80]!r}")
            yield record

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered (non-zero at EOF means truncation)."""
        return len(self._buffer)


class Channel:
    """The write end of the result pipe (or the builder's socket), usable only by the process
    that owns it: setup errors of every process of a sandbox, the test's reports from C.

    A process the test forks inherits the object; its records are dropped so a forked child
    that returns into pytest's code cannot report twice.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.owner = os.getpid()

    def send(self, kind: str, **fields: Any) -> None:
        if os.getpid() == self.owner:
            send(self.fd, {"kind": kind, **fields})
