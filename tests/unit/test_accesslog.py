"""Access logs: formats, levels, files shared by path, reopen for rotation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from wmproxy_tw.config.model import AccessLog, LogTarget
from wmproxy_tw.observe.accesslog import (
    AccessLogError,
    AccessLogs,
    IAccessLogSink,
    LogFile,
    MemorySink,
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
    """Nothing is opened before the first line; after the file is moved away, reopen() starts a fresh one."""
    path = tmp_path / "sub" / "a.log"
    logs = AccessLogs({"f": "{status}"}, {"acc": LogTarget(str(path))})
    logger = logs.get(AccessLog("acc", "f"))
    assert logger is not None and not path.parent.exists()  # building has no side effects
    logger.log(lookup, 0.0)
    os.rename(path, tmp_path / "a.log.1")
    logger.log(lookup, 0.0)
    logs.reopen()
    logger.log(lookup, 0.0)
    logs.close()
    assert (tmp_path / "a.log.1").read_text() == "200\n200\n"
    assert path.read_text() == "200\n"


def test_unwritable_path_is_an_error(tmp_path: Path) -> None:
    """A log path that cannot be written fails at build time with one line."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(AccessLogError, match="cannot open access log"):
            LogFile(str(folder / "a.log"))
    finally:
        folder.chmod(0o700)


def test_device_paths_are_accepted_and_write_failures_warn_once() -> None:
    """A device such as /dev/full (or /dev/stdout) is a valid log path; when every write fails
    (disk full) one warning is logged, not one per line, until a write works again."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        sink = LogFile("/dev/full")
        for _ in range(5):
            sink.write("a line")
        sink.reopen()  # a rotation: the next failure is news again
        sink.write("a line")
        sink.close()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if "cannot write access log" in e.get("log_format", "")]
    assert len(warnings) == 2 and all(e["path"] == "/dev/full" for e in warnings)
    with pytest.raises(AccessLogError):
        LogFile(str(Path("/")))  # a folder is not a log file
