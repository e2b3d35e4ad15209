"""The supervisor ↔ worker JSON-lines codec."""

from __future__ import annotations

import pytest

from wmproxy_tw.control.channel import JsonLines, encode

pytestmark = pytest.mark.timeout(10)


def test_one_byte_at_a_time() -> None:
    """Messages fed one byte at a time come out whole, in order; newlines inside strings are safe."""
    data = encode({"op": "reload", "text": "a = 1\nb = 2\n"}) + encode({"id": 2, "ok": True})
    dec = JsonLines()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i:i + 1])
    assert out == [{"op": "reload", "text": "a = 1\nb = 2\n"}, {"id": 2, "ok": True}]


def test_bounded() -> None:
    """A line longer than the limit is refused, not buffered forever; bad JSON raises ValueError."""
    dec = JsonLines(max_line=100)
    with pytest.raises(ValueError):
        dec.feed(b"x" * 101)
    with pytest.raises(ValueError):
        JsonLines().feed(b"{nope\n")
