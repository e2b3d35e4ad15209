"""``twistd wmproxy``: options, start-up checks, signals and the service tree.

This is the only module that touches the global reactor.  Every operator
mistake (bad config, port in use, unreadable certificate) ends here as one
line on stderr and exit status 1, before twistd daemonizes.

Signals (installed once the reactor runs, replacing the reactor's own):

* SIGTERM, SIGINT: graceful stop (see ``ProxyService.graceful_stop``); a
  second one aborts what is still open.  The reactor's own handlers would
  record the signal in ``reactor._exitSignal``, and twistd then re-raises it
  on itself after shutdown, so a clean stop would end with "killed by
  SIGTERM".  Ours call ``reactor.stop()`` without recording anything, so
  twistd exits with status 0 after a graceful stop — no private attribute
  is touched.
* SIGHUP: reload the configuration file (errors are logged; the running
  configuration stays).
* SIGUSR1: reopen log files.  twistd's own SIGUSR1 handler rotates its log
  file by renaming it itself; when logrotate has already moved the file, we
  reopen it instead (the one place we look inside twistd: its handler's
  closure, for the ``LogFile``), and features reopen their access logs.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from twisted.application import service
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python import logfile, usage

from .config import ConfigError, Loaded, load_config
from .config.load import load_text
from .listen import StartupError

__all__ = ["Options", "makeService", "default_config_text", "install_signal_handlers", "raise_nofile_limit"]

_log = Logger()

DEFAULT_CONFIG = """\
# Built-in default: a forward proxy (HTTP, HTTPS CONNECT, SOCKS5) on loopback,
# and the control API on 127.0.0.1:8837 (the default of `control`).
[proxy]
bind = "127.0.0.1:8090"
"""


def default_config_text() -> str:
    return DEFAULT_CONFIG


def _fail(lines: list[str] | str, code: int = 1) -> None:
    if isinstance(lines, str):
        lines = [lines]
    for line in lines:
        sys.stderr.write(f"wmproxy: {line}\n")
    raise SystemExit(code)


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


class QuickOptions(usage.Options):
    """A sub-command that runs one feature without a file.

    Each says its sections in :meth:`sections`; ``--control ADDR`` / ``--no-control``
    (shared by all) place or turn off the control API, so two of them can run at once.
    """

    optParameters = [["control", None, None, "control API address (default 127.0.0.1:8837)"]]
    optFlags = [["no-control", None, "serve no control API"]]

    def postOptions(self) -> None:
        if self["control"] and self["no-control"]:
            raise usage.UsageError("--control and --no-control exclude each other")

    def to_toml(self) -> str:
        """The configuration file this command line stands for."""
        lines = []
        if self["control"]:
            lines.append(f"control = {_quote(self['control'])}")
        if self["no-control"]:
            lines.append("disable_control = true")
        return "\n".join(lines + self.sections()) + "\n"

    def sections(self) -> list[str]:
        raise NotImplementedError


class ProxyOptions(QuickOptions):
    """``twistd wmproxy proxy``: a forward proxy without a file."""

    synopsis = "[-b ADDR] [--user U --pass P] [--flag 'http https socks5'] [-S PARENT --ts] [--control ADDR | --no-control]"
    optParameters = [
        ["bind", "b", "127.0.0.1:8090", "address to listen on"],
        ["user", None, None, "username clients must give"],
        ["pass", None, None, "password clients must give"],
        ["flag", None, "http https socks5", "protocols served"],
        ["server", "S", None, "parent proxy to relay to (host:port)"],
    ]
    optFlags = [
        ["ts", None, "connect to the parent over TLS"],
        ["allow-open-proxy", None, "allow an unauthenticated non-loopback bind"],
    ]

    def sections(self) -> list[str]:
        lines = ["[proxy]", f"bind = {_quote(self['bind'])}", f"flag = {_quote(self['flag'])}"]
        if self["user"] is not None or self["pass"] is not None:
            if not (self["user"] and self["pass"]):
                raise usage.UsageError("--user and --pass go together")
            lines += [f"username = {_quote(self['user'])}", f"password = {_quote(self['pass'])}"]
        if self["server"]:
            lines.append(f"server = {_quote(self['server'])}")
        if self["ts"]:
            lines.append("ts = true")
        if self["allow-open-proxy"]:
            lines.append("allow_open_proxy = true")
        return lines


class WsProxyOptions(QuickOptions):
    """``twistd wmproxy ws-proxy``: one tcp2ws / tcp2wss / ws2tcp bridge without a file."""

    synopsis = "--mode tcp2ws|tcp2wss|ws2tcp -b ADDR -t URL [--domain NAME] [--path /P] [--control ADDR | --no-control]"
    optParameters = [
        ["mode", "m", None, "tcp2ws (TCP in, WebSocket out), tcp2wss (the same over TLS) or ws2tcp"],
        ["bind", "b", None, "address to listen on, e.g. 127.0.0.1:8085"],
        ["target", "t", None, "tcp2ws: ws://host:port/path (or wss://); ws2tcp: host:port"],
        ["domain", None, None, "tcp2ws: Host header and TLS name; ws2tcp: the only Host accepted"],
        ["path", None, None, "ws2tcp: the only path accepted (others get 404)"],
    ]
    optFlags = [["insecure", "k", "tcp2wss: do not verify the server's certificate"]]

    def postOptions(self) -> None:
        super().postOptions()
        if self["mode"] not in ("tcp2ws", "tcp2wss", "ws2tcp"):
            raise usage.UsageError("--mode must be tcp2ws, tcp2wss or ws2tcp")
        if not self["bind"] or not self["target"]:
            raise usage.UsageError("-b ADDR and -t URL are both needed")

    def sections(self) -> list[str]:
        lines = ["[[stream.server]]", f"bind_mode = {_quote(self['mode'])}",
                 f"bind_addr = {_quote(self['bind'])}", f"proxy_url = {_quote(self['target'])}"]
        if self["domain"]:
            lines.append(f"domain = {_quote(self['domain'])}")
        if self["path"]:
            lines.append(f"path = {_quote(self['path'])}")
        if self["insecure"]:
            lines.append("proxy_ssl_verify = false")
        return lines


class ReverseProxyOptions(QuickOptions):
    """``twistd wmproxy reverse-proxy``: one address proxied to one upstream URL."""

    synopsis = "[-b ADDR] -t URL [--control ADDR | --no-control]"
    optParameters = [
        ["bind", "b", "127.0.0.1:8869", "address to listen on"],
        ["to", "t", None, "upstream: http://host:port[/path], https://..., or host:port"],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["to"]:
            raise usage.UsageError("-t URL is required (e.g. -t http://127.0.0.1:8080)")

    def sections(self) -> list[str]:
        return ["[http]", "[[http.server]]", f"bind_addr = {_quote(self['bind'])}",
                "[[http.server.location]]", 'rule = "/"', f"proxy_url = {_quote(self['to'])}"]


class FileServerOptions(QuickOptions):
    """``twistd wmproxy file-server``: serve a folder without a file."""

    synopsis = "-b ADDR -r ROOT [--browse] [--control ADDR | --no-control]"
    optParameters = [
        ["bind", "b", "127.0.0.1:8080", "address to listen on"],
        ["root", "r", ".", "folder to serve"],
    ]
    optFlags = [["browse", None, "list folders that have no index file"]]

    def postOptions(self) -> None:
        import os

        super().postOptions()
        root = os.path.abspath(self["root"])
        if not os.path.isdir(root):
            raise usage.UsageError(f"--root {self['root']!r} is not a folder")
        self["root"] = root

    def sections(self) -> list[str]:
        fs = f"root = {_quote(self['root'])}" + (", browse = true" if self["browse"] else "")
        return ["[http]", "[[http.server]]", f"bind_addr = {_quote(self['bind'])}",
                "[[http.server.location]]", 'rule = "/"', f"file_server = {{ {fs} }}"]


class Options(usage.Options):
    """``twistd wmproxy [-c FILE] [--check] [SUBCOMMAND]``."""

    synopsis = "[-c FILE] [--check] [proxy ... | ws-proxy ... | reverse-proxy ... | file-server ...]"
    longdesc = "All-in-one proxy: forward, reverse, L4, WebSocket and NAT traversal."
    optParameters = [["config", "c", None, "configuration file (.toml, .yaml)"]]
    optFlags = [["check", None, "validate the configuration, print the listeners, exit"]]
    subCommands = [
        ["proxy", None, ProxyOptions, "run a forward proxy without a configuration file"],
        ["ws-proxy", None, WsProxyOptions, "run one tcp2ws / ws2tcp bridge without a configuration file"],
        ["reverse-proxy", None, ReverseProxyOptions, "proxy one address to one upstream URL, no file"],
        ["file-server", None, FileServerOptions, "serve a folder without a configuration file"],
    ]

    loaded: Loaded

    def postOptions(self) -> None:
        try:
            if self.subCommand is not None:
                if self["config"]:
                    raise usage.UsageError(f"-c and the {self.subCommand} sub-command exclude each other")
                self.loaded = load_text(self.subOptions.to_toml(), "<command line>.toml")
            elif self["config"]:
                self.loaded = load_config(self["config"])
            else:
                self.loaded = load_text(DEFAULT_CONFIG, "<built-in default>.toml")
        except ConfigError as e:
            _fail(e.errors)
        for w in self.loaded.warnings:
            sys.stderr.write(f"wmproxy: warning: {w}\n")
        from .service import plan

        try:
            lines = plan(self.loaded.config)
        except StartupError as e:
            _fail(str(e))
        if self["check"]:
            sys.stdout.write(f"{self.loaded.path}: configuration OK\n")
            for line in lines:
                sys.stdout.write(f"  {line}\n")
            raise SystemExit(0)


def raise_nofile_limit(resource_mod: Any = None) -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (what nginx's
    ``worker_rlimit_nofile`` is for): a proxy holds two descriptors per relayed
    connection, and the usual soft default of 1024 caps it at a few hundred
    clients.  An unlimited hard limit gives 65536.  Returns (before, after);
    never fails start-up."""
    if resource_mod is None:
        try:
            import resource as resource_mod
        except ImportError:  # not on this platform
            return (-1, -1)
    soft, hard = resource_mod.getrlimit(resource_mod.RLIMIT_NOFILE)
    target = 65536 if hard == resource_mod.RLIM_INFINITY else hard
    if soft == resource_mod.RLIM_INFINITY or soft >= target:
        return (soft, soft)
    try:
        resource_mod.setrlimit(resource_mod.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        _log.warn("cannot raise the open-files limit from {soft} to {target}: {e}", soft=soft, target=target, e=e)
        return (soft, soft)
    _log.info("open-files limit raised from {soft} to {target}", soft=soft, target=target)
    return (soft, target)


def makeService(options: Options) -> service.IService:
    """Build the service tree and bind every listener (fail here, loudly)."""
    from twisted.internet import reactor

    from .service import ProxyService, resolve_workers

    raise_nofile_limit()
    loaded = options.loaded
    svc: Any
    if resolve_workers(loaded.config) > 1:
        from .control.supervisor import Supervisor

        svc = Supervisor(reactor, loaded, resolve_workers(loaded.config))
        try:
            svc.preflight()
        except StartupError as e:
            svc.abandon()
            _fail(str(e))
    else:
        svc = ProxyService(reactor, loaded)
        try:
            svc.bind_all()
        except StartupError as e:
            svc.abandon()
            _fail(str(e))
    svc.stopper = reactor.stop
    reactor.callWhenRunning(install_signal_handlers, reactor, svc)
    return svc


def install_signal_handlers(reactor: Any, svc: Any) -> None:
    """SIGTERM/SIGINT stop gracefully, SIGHUP reloads, SIGUSR1 reopens logs (module docstring)."""

    def on(signum: int, action: Callable[[], Any]) -> None:
        signal.signal(signum, lambda _n, _f: reactor.callFromThread(action))

    def reload() -> None:
        from .control.api import ReloadError

        d = maybeDeferred(svc.control_reload)
        d.addErrback(lambda f: f.trap(ReloadError))  # already logged, with every message
        d.addErrback(lambda f: _log.failure("SIGHUP reload crashed", f))

    twistd_log = _twistd_logfile(signal.getsignal(signal.SIGUSR1))

    def reopen() -> None:
        if twistd_log is not None:
            if os.path.exists(twistd_log.path):
                twistd_log.rotate()  # twistd's own behaviour: rename and reopen
            else:
                twistd_log.reopen()  # logrotate moved it away
        svc.reopen_logs()

    on(signal.SIGTERM, svc.request_stop)
    on(signal.SIGINT, svc.request_stop)
    on(signal.SIGHUP, reload)
    on(signal.SIGUSR1, reopen)
    _log.info("signals: SIGHUP reloads, SIGTERM/SIGINT stop gracefully, SIGUSR1 reopens logs")


def _twistd_logfile(handler: Any) -> logfile.LogFile | None:
    """The LogFile twistd's SIGUSR1 handler rotates (twistd keeps no other reference)."""
    for cell in getattr(handler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, logfile.LogFile):
            return value
    return None


def run_check(path: str) -> int:
    """``wmproxy check -c FILE``: 0 when valid, 1 with the errors otherwise."""
    opts = Options()
    try:
        opts.parseOptions(["--check", "-c", path])
    except SystemExit as e:
        return int(e.code or 0)
    return 0

