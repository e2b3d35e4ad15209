"""``twistd wmproxy``: options, start-up checks and the service tree.

This is the only module that touches the global reactor.  Every operator
mistake (bad config, port in use, unreadable certificate) ends here as one
line on stderr and exit status 1, before twistd daemonizes.
"""

from __future__ import annotations

import sys
from twisted.application import service
from twisted.python import usage

from .config import ConfigError, Loaded, load_config
from .config.load import load_text
from .listen import StartupError

__all__ = ["Options", "makeService", "default_config_text"]

DEFAULT_CONFIG = """\
# Built-in default: a forward proxy (HTTP, HTTPS CONNECT, SOCKS5) on loopback.
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


class ProxyOptions(usage.Options):
    """``twistd wmproxy proxy``: a forward proxy without a file."""

    synopsis = "[-b ADDR] [--user U --pass P] [--flag 'http https socks5'] [-S PARENT --ts]"
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

    def to_toml(self) -> str:
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
        return "\n".join(lines) + "\n"


class FileServerOptions(usage.Options):
    """``twistd wmproxy file-server``: serve a folder without a file."""

    synopsis = "-b ADDR -r ROOT [--browse]"
    optParameters = [
        ["bind", "b", "127.0.0.1:8080", "address to listen on"],
        ["root", "r", ".", "folder to serve"],
    ]
    optFlags = [["browse", None, "list folders that have no index file"]]

    def postOptions(self) -> None:
        import os

        root = os.path.abspath(self["root"])
        if not os.path.isdir(root):
            raise usage.UsageError(f"--root {self['root']!r} is not a folder")
        self["root"] = root

    def to_toml(self) -> str:
        fs = f"root = {_quote(self['root'])}" + (", browse = true" if self["browse"] else "")
        return "\n".join([
            "[http]", "[[http.server]]", f"bind_addr = {_quote(self['bind'])}",
            "[[http.server.location]]", 'rule = "/"', f"file_server = {{ {fs} }}",
        ]) + "\n"


class Options(usage.Options):
    """``twistd wmproxy [-c FILE] [--check] [SUBCOMMAND]``."""

    synopsis = "[-c FILE] [--check] [proxy ... | file-server ...]"
    longdesc = "All-in-one proxy: forward, reverse, L4, WebSocket and NAT traversal."
    optParameters = [["config", "c", None, "configuration file (.toml, .yaml)"]]
    optFlags = [["check", None, "validate the configuration, print the listeners, exit"]]
    subCommands = [
        ["proxy", None, ProxyOptions, "run a forward proxy without a configuration file"],
        ["file-server", None, FileServerOptions, "serve a folder without a configuration file"],
    ]

    loaded: Loaded

    def postOptions(self) -> None:
        try:
            if self.subCommand in ("proxy", "file-server"):
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


def makeService(options: Options) -> service.IService:
    """Build the service tree and bind every listener (fail here, loudly)."""
    from twisted.internet import reactor

    from .service import ProxyService

    svc = ProxyService(reactor, options.loaded)
    try:
        svc.bind_all()
    except StartupError as e:
        svc.abandon()
        _fail(str(e))
    return svc


def run_check(path: str) -> int:
    """``wmproxy check -c FILE``: 0 when valid, 1 with the errors otherwise."""
    opts = Options()
    try:
        opts.parseOptions(["--check", "-c", path])
    except SystemExit as e:
        return int(e.code or 0)
    return 0

