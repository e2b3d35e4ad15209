"""The supervisor ↔ worker pipe: one JSON document per line (sans-IO).

The supervisor writes to a worker's stdin; the worker answers on its stdout
(its log goes to stderr).  Messages:

* supervisor → worker: the first line ``{"op": "start", "name", "text",
  "index"}`` (the configuration to run), then requests ``{"id", "op":
  "status" | "metrics" | "reload" | "stop" | "reopen_logs", ...}``;
* worker → supervisor: events ``{"event": "ready" | "failed", ...}`` and
  replies ``{"id", "ok": bool, "body" | "errors"}``.

``json.dumps`` escapes newlines inside strings, so a line is a document.
A worker whose stdin closes (the supervisor died) stops gracefully.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JsonLines", "encode", "MAX_LINE"]

#: Longest message (a configuration text, a /metrics exposition).
MAX_LINE = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


class JsonLines:
    """Split a byte stream into JSON documents, one per line, bounded."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The complete documents in ``data`` (and what came before); raise ValueError."""
        self._buf += data
        out = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buf[start:end])
            start = end + 1
            if line.strip():
                out.append(json.loads(line))
        del self._buf[:start]
        if len(self._buf) > self.max_line:
            raise ValueError(f"a message longer than {self.max_line} bytes")
        return out
