"""Access logs: formats, levels, files shared by path, reopen for rotation."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from wmproxy_tw.config.model import AccessLog, LogTarget
from wmproxy_tw.observe.accesslog import (
    AccessLogError,
    AccessLogs,
    IAccessLogSink,
    LogFile,
    MemorySink,
    install_reopen_signal,
    reopen_all,
)


def lookup(name: str, arg: str | None) -> str | None:
    return {"status": "200", "client_ip": "10.0.0.1", "url": "/x"}.get(name)


def test_format_level_and_unknown_names() -> None:
    """{d(FMT)} formats the request time, {l} is the level, unknown names print '-'."""
    sink = MemorySink()
    verifyObject(IAccessLogSink, sink)
    logs = AccessLogs({"main": "{d(%Y)} {l} {client_ip} {url} {status} {cookie}"}, {"acc": LogTarget("unused")},
                      open_file=lambda path: sink)
    logger = logs.get(AccessLog("acc", "main", "warn"))
    assert logger is not None
    logger.log(lookup, when=time.mktime((2024, 6, 1, 12, 0, 0, 0, 0, -1)))
    assert sink.lines == ["2024 WARN 10.0.0.1 /x 200 -"]


def test_levels_filter_and_files_are_shared(tmp_path: Path) -> None:
    """A line below its file's level is never written; two settings on one path share one file."""
    path = str(tmp_path / "logs" / "access.log")
    logs = AccessLogs({"f": "{status}"}, {"acc": LogTarget(path, "info"), "acc2": LogTarget(path, "trace")})
    assert logs.get(AccessLog("acc", "f", "debug")) is None
    a = logs.get(AccessLog("acc", "f"))
    b = logs.get(AccessLog("acc2", "f", "trace"))
    assert a is not None and b is not None and a.sink is b.sink
    a.log(lookup, 0.0)
    b.log(lookup, 0.0)
    assert Path(path).read_text() == "200\n200\n"
    logs.close()


def test_unknown_format_is_an_error() -> None:
    """access_log naming a format that log_format lacks fails at build time."""
    with pytest.raises(AccessLogError, match="no log_format named 'nope'"):
        AccessLogs({}, {}).get(AccessLog("acc", "nope"))


def test_reopen_after_rotation(tmp_path: Path) -> None:
    """After the file is moved away, reopen_all() starts a fresh file at the path."""
    path = tmp_path / "a.log"
    f = LogFile(str(path))
    f.write("one")
    os.rename(path, tmp_path / "a.log.1")
    f.write("two")
    reopen_all()
    f.write("three")
    f.close()
    assert (tmp_path / "a.log.1").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\n"


def test_sigusr1_handler_chains_and_restores() -> None:
    """SIGUSR1 schedules a reopen through the reactor, calls the earlier handler, and is restored."""
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: calls.append("previous"))
    reactor = MemoryReactorClock()
    scheduled = []
    reactor.callFromThread = lambda f, *a: scheduled.append(f)  # type: ignore[method-assign]
    try:
        restore = install_reopen_signal(reactor)
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)  # type: ignore[operator]
        assert scheduled == [reopen_all] and calls == ["previous"]
        restore()
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)  # type: ignore[operator]
        assert calls == ["previous", "previous"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
