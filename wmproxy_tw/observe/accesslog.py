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

Files are opened on their first line, appended to line by line, and
reopened (for log rotation) by :meth:`AccessLogs.reopen` (``SIGUSR1`` →
the service → each feature's ``reopen_logs``).
"""

from __future__ import annotations

import os
import time
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


def _check_writable(path: str) -> None:
    """AccessLogError unless ``path`` can be appended to (or created): no side effects."""
    if os.path.exists(path):
        # a regular file, or a device/pipe such as /dev/stdout (not a folder)
        ok = not os.path.isdir(path) and os.access(path, os.W_OK)
    else:
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        ok = os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)
    if not ok:
        raise AccessLogError(f"cannot open access log {path}: not writable")


@implementer(IAccessLogSink)
class LogFile:
    """An append-only log file, unbuffered, reopened by :meth:`reopen`.

    Building one only checks that the path is writable: the file is opened
    (and its folder made) on the first line, so building a configuration
    (``--check``, a reload being validated) has no side effects.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: Any = None
        self._failed = False  # opening failed (warned once); retried by reopen()
        self._write_failing = False  # writes fail (disk full): warned once until one succeeds
        self._closed = False
        _check_writable(path)

    def _open(self) -> None:
        folder = os.path.dirname(self.path)
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._fh = open(self.path, "ab", buffering=0)
        except OSError as e:
            self._failed = True
            _log.warn("cannot open access log {path}: {why}", path=self.path, why=e.strerror or str(e))

    def write(self, line: str) -> None:
        if self._fh is None:
            if self._closed or self._failed:
                return
            self._open()
            if self._fh is None:
                return
        try:
            self._fh.write(line.encode("latin-1", "replace") + b"\n")
        except OSError as e:
            if not self._write_failing:  # once per episode, not once per request
                self._write_failing = True
                _log.warn("cannot write access log {path}: {why} (lines are dropped until it works again)",
                          path=self.path, why=e.strerror or str(e))
            return
        if self._write_failing:
            self._write_failing = False
            _log.info("access log {path} is written again", path=self.path)

    def reopen(self) -> None:
        """After rotation: the next line goes to a fresh file at the path."""
        old, self._fh = self._fh, None
        self._failed = self._write_failing = False
        if old is not None:
            old.close()

    def close(self) -> None:
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:  # a replaced configuration's files close when it is let go
        self.close()


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

    def reopen(self) -> None:
        """SIGUSR1 (after logrotate): reopen every file of this section."""
        for sink in self._sinks.values():
            reopen = getattr(sink, "reopen", None)
            if reopen is not None:
                reopen()

    def close(self) -> None:
        for sink in self._sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self._sinks.clear()
