"""Access logs: ``access_log``, ``log_format`` and ``log_names`` (SPEC §4).

``access_log = "LOGGER [FORMAT] [LEVEL]"`` picks a logger of
``[http.log_names]`` (``NAME = "PATH [LEVEL]"``) and a pattern of
``[http.log_format]``.  A line is written when the response ends (its
status and timings are real), if its LEVEL (default ``info``) is at least
the logger's.  A logger name that ``log_names`` does not define writes to the
process log (``twisted.logger``, namespace ``wmproxy.access``).

Patterns are :class:`wmproxy_tw.headers.Template` text.  This module knows
only ``{d(FMT)}`` (the request's start time through ``strftime``, local
time) and ``{l}`` (the line's level); every other name comes from the
caller's lookup, so any feature can log with its own variables (the reverse
proxy's are listed in SPEC §4).  Unknown names print ``-``.

Files are opened once, appended to line by line, and reopened (for log
rotation) on ``SIGUSR1`` via :func:`install_reopen_signal`.
"""

from __future__ import annotations

import os
import signal
import time
import weakref
from typing import Any, Callable, Optional

from twisted.logger import Logger
from zope.interface import Interface, implementer

from ..config.model import AccessLog, LogTarget
from ..headers import Lookup, Template

__all__ = [
    "DEFAULT_FORMAT",
    "IAccessLogSink",
    "LogFile",
    "LoggerSink",
    "MemorySink",
    "AccessLogger",
    "AccessLogs",
    "AccessLogError",
    "install_reopen_signal",
    "reopen_all",
]

_log = Logger(namespace="wmproxy.access")

#: nginx's "combined" plus the request time, when no FORMAT is named.
DEFAULT_FORMAT = ('{client_ip} - - [{d(%d/%b/%Y:%H:%M:%S %z)}] "{method} {url} {protocol}" {status} '
                  '{body_bytes_sent} "{referer}" "{user_agent}" {request_time}')

LEVELS = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "error": 4}


class AccessLogError(Exception):
    """An access log that cannot be used (unknown format, unwritable file)."""


class IAccessLogSink(Interface):
    """Where formatted access-log lines go."""

    def write(line: str) -> None:
        """Append one line (no trailing newline; Latin-1 clothing of its bytes)."""


_files: "weakref.WeakSet[LogFile]" = weakref.WeakSet()


@implementer(IAccessLogSink)
class LogFile:
    """An append-only log file, line-buffered, reopened by :meth:`reopen`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: Any = None
        self._open()
        _files.add(self)

    def _open(self) -> None:
        folder = os.path.dirname(self.path)
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._fh = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise AccessLogError(f"cannot open access log {self.path}: {e.strerror or e}") from None

    def write(self, line: str) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(line.encode("latin-1", "replace") + b"\n")
        except OSError as e:
            _log.warn("cannot write access log {path}: {why}", path=self.path, why=e.strerror or str(e))

    def reopen(self) -> None:
        old, self._fh = self._fh, None
        if old is not None:
            old.close()
        try:
            self._open()
        except AccessLogError as e:
            _log.warn("{why}", why=str(e))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        _files.discard(self)


@implementer(IAccessLogSink)
class LoggerSink:
    """Lines to the process log (``twisted.logger``), for loggers without a file."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, line: str) -> None:
        _log.info("{logger}: {line}", logger=self.name, line=line)


@implementer(IAccessLogSink)
class MemorySink:
    """In-memory double: ``lines`` holds what was written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


class AccessLogger:
    """One ``access_log`` setting: a pattern, a sink and a level."""

    def __init__(self, template: Template, sink: IAccessLogSink, level: str = "info") -> None:
        self.template = template
        self.sink = sink
        self.level = level

    def log(self, lookup: Lookup, when: float) -> None:
        """Format one line with ``lookup`` (request start time ``when``) and write it."""
        level = self.level

        def full(name: str, arg: Optional[str]) -> Optional[str]:
            if name == "d":
                return time.strftime(arg or "%Y-%m-%d %H:%M:%S", time.localtime(when))
            if name == "l":
                return level.upper()
            return lookup(name, arg)

        self.sink.write(self.template.render(full, missing="-"))


def _rank(level: Optional[str]) -> int:
    return LEVELS.get((level or "info").lower(), LEVELS["info"])


class AccessLogs:
    """The access loggers of one ``[http]`` section, sharing files by path."""

    def __init__(self, formats: dict[str, str], names: dict[str, LogTarget],
                 open_file: Callable[[str], IAccessLogSink] = LogFile) -> None:
        self.formats = {k: Template(v) for k, v in formats.items()}
        self.names = names
        self._open_file = open_file
        self._sinks: dict[str, IAccessLogSink] = {}
        self._cache: dict[AccessLog, Optional[AccessLogger]] = {}

    def get(self, setting: Optional[AccessLog]) -> Optional[AccessLogger]:
        """The logger for a location's ``access_log``; None when nothing is written.

        Raises :class:`AccessLogError` for an unknown format or unopenable file.
        """
        if setting is None:
            return None
        if setting in self._cache:
            return self._cache[setting]
        if setting.format is not None and setting.format not in self.formats:
            known = ", ".join(sorted(self.formats)) or "none"
            raise AccessLogError(f"access_log {setting.logger} {setting.format}: no log_format named "
                                 f"{setting.format!r} (defined: {known})")
        template = self.formats[setting.format] if setting.format else Template(DEFAULT_FORMAT)
        target = self.names.get(setting.logger)
        logger: Optional[AccessLogger]
        if target is None:
            logger = AccessLogger(template, LoggerSink(setting.logger), setting.level or "info")
        elif _rank(setting.level) < _rank(target.level):
            logger = None  # below the file's level: never written
        else:
            sink = self._sinks.get(target.path)
            if sink is None:
                sink = self._sinks[target.path] = self._open_file(target.path)
            logger = AccessLogger(template, sink, setting.level or "info")
        self._cache[setting] = logger
        return logger

    def close(self) -> None:
        for sink in self._sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self._sinks.clear()


def reopen_all() -> None:
    """Reopen every open access-log file (after rotation)."""
    for f in list(_files):
        f.reopen()


def install_reopen_signal(reactor: Any) -> Callable[[], None]:
    """Reopen the log files on SIGUSR1 (chaining any earlier handler, e.g. twistd's).

    Returns a function that restores the previous handler.  A no-op outside
    the main thread or where SIGUSR1 does not exist.
    """
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None:
        return lambda: None
    try:
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any) -> None:
            reactor.callFromThread(reopen_all)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)
    except ValueError:  # not the main thread
        return lambda: None

    def restore() -> None:
        try:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        except ValueError:
            pass

    return restore
