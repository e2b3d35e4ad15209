"""A worker process: ``python -m wmproxy_tw.control.worker --index N``.

Started by :class:`wmproxy_tw.control.supervisor.Supervisor`, never by
hand.  It reads its configuration from the first line of stdin, runs a
:class:`~wmproxy_tw.service.ProxyService` whose listeners are shared with the
other workers (``SO_REUSEPORT``) and without a control API, and answers the
supervisor's requests (:mod:`.channel`).  Like ``tap.py``, this entry point
imports the global reactor (inside :func:`main`).

Signals: SIGTERM stops gracefully (a second one aborts); SIGINT and SIGHUP
are ignored (a Ctrl-C in a terminal reaches the whole process group: the
supervisor decides; reloads come from the supervisor); SIGUSR1 reopens logs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from ..config import ConfigError, load_text
from ..listen import StartupError
from .api import ReloadError
from .channel import MAX_LINE, JsonLines, encode

__all__ = ["main", "WorkerChannel"]

_log = Logger()


class WorkerChannel(Protocol):
    """The worker's end of the pipe: requests in on stdin, replies out on stdout."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.decoder = JsonLines()

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(encode(message))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ValueError as e:
            _log.error("worker: unreadable message from the supervisor ({e}): stopping", e=e)
            self.svc.request_stop()
            return
        for m in messages:
            self.handle(m)

    def handle(self, m: dict[str, Any]) -> None:
        op, mid = m.get("op"), m.get("id")
        svc = self.svc
        if op == "status":
            self.send({"id": mid, "ok": True, "body": svc.status()})
        elif op == "metrics":
            self.send({"id": mid, "ok": True, "body": svc.stats.render().decode()})
        elif op == "reload":
            try:
                summary = svc.reload(load_text(m["text"], m["name"]))
            except ConfigError as e:
                self.send({"id": mid, "ok": False, "errors": e.errors})
            except ReloadError as e:
                self.send({"id": mid, "ok": False, "errors": e.errors})
            else:
                self.send({"id": mid, "ok": True, "body": summary})
        elif op == "stop":
            self.send({"id": mid, "ok": True})
            svc.request_stop()
        elif op == "reopen_logs":
            svc.reopen_logs()
        else:
            self.send({"id": mid, "ok": False, "errors": [f"unknown op {op!r}"]})

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        _log.info("worker: the supervisor closed the pipe: stopping")
        self.svc.request_stop()


def _read_hello(fd: int = 0) -> tuple[dict[str, Any], bytes]:
    """The first line of stdin (blocking: the reactor is not running yet) and what followed it."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("wmproxy worker: no configuration on stdin (start workers through twistd wmproxy)")
        buf += chunk
        if len(buf) > MAX_LINE:
            raise SystemExit("wmproxy worker: configuration message too long")
    line, _, rest = bytes(buf).partition(b"\n")
    decoded = JsonLines().feed(line + b"\n")
    return decoded[0], rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wmproxy-worker")
    parser.add_argument("--index", type=int, default=0)
    parser.parse_args(argv)
    hello, rest = _read_hello()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr, timeFormat=None)], redirectStandardIO=False)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    from ..service import ProxyService

    def fail(why: str) -> int:
        os.write(1, encode({"event": "failed", "error": why}))
        return 1

    try:
        loaded = load_text(hello["text"], hello["name"])
    except ConfigError as e:
        return fail("; ".join(e.errors))
    svc = ProxyService(reactor, loaded, control=False, reuse_port=True, role="worker")
    try:
        svc.bind_all()
    except StartupError as e:
        svc.abandon()
        return fail(str(e))
    svc.stopper = reactor.stop
    channel = WorkerChannel(svc)
    StandardIO(channel, reactor=reactor)

    def running() -> None:
        signal.signal(signal.SIGTERM, lambda _n, _f: reactor.callFromThread(svc.request_stop))  # type: ignore[attr-defined]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda _n, _f: reactor.callFromThread(svc.reopen_logs))  # type: ignore[attr-defined]
        svc.startService()
        channel.send({"event": "ready", "pid": os.getpid(), "hash": loaded.source_hash})
        if rest:
            channel.dataReceived(rest)

    reactor.callWhenRunning(running)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
