"""``wmproxy``: check a file, talk to a running instance (reload, stop, status), make certificates.

``wmproxy reload --fleet -c FILE`` reloads every live node of the file's
``[fleet]`` through its Redis instead (one line per node).

The instance is found at ``-u URL`` (default http://127.0.0.1:8837), or at
the ``control`` address of ``-c FILE``; the token comes from ``-t``, then
``$WMPROXY_CONTROL_TOKEN``, then ``control_token`` in ``-c FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Optional

from .config import ConfigError, load_config

DEFAULT_CONTROL = "http://127.0.0.1:8837"
TOKEN_ENV = "WMPROXY_CONTROL_TOKEN"


def _call(url: str, method: str, token: str | None, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through $http_proxy
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def _errors(body: str) -> list[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        return [body.strip()]
    return [str(e) for e in doc.get("errors", [])] if isinstance(doc, dict) else [body.strip()]


def _target(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """The control URL and token from -u/-t, the environment and -c FILE."""
    url, token = args.url, args.token or os.environ.get(TOKEN_ENV) or None
    if args.config:
        loaded = load_config(args.config)  # ConfigError: reported by main
        cfg = loaded.config
        if cfg.disable_control:
            raise ConfigError([f"{args.config}: disable_control = true: this instance has no control API "
                               "(use signals: kill -HUP / -TERM <pid>)"])
        if url is None:
            host = "127.0.0.1" if cfg.control.host in ("0.0.0.0", "") else ("::1" if cfg.control.host == "::" else cfg.control.host)
            url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.control.port}"
        token = token or cfg.control_token
    url = url or DEFAULT_CONTROL
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/"), token


def _gen_cert(args: argparse.Namespace) -> int:
    from .certgen import generate

    if args.days < 1:
        sys.stderr.write("wmproxy: --days must be at least 1\n")
        return 1
    try:
        files = generate(args.out, args.name, args.client_name, args.days, args.force)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"wmproxy: gen-cert: {e}\n")
        return 1
    sys.stdout.write(
        f"wrote {files.ca_cert} (CA), {files.server_cert} + {files.server_key} (server), "
        f"{files.client_cert} + {files.client_key} (client)\n"
        f"tunnel server: tc = true, cert = \"{files.server_cert}\", key = \"{files.server_key}\""
        f" (two_way_tls: ca = \"{files.ca_cert}\")\n"
        f"tunnel client: ts = true, ca = \"{files.ca_cert}\""
        f" (two_way_tls: cert = \"{files.client_cert}\", key = \"{files.client_key}\")\n")
    return 0


def _fleet_reload(args: argparse.Namespace) -> int:
    """``reload --fleet``: through the fleet's Redis (a short-lived connection under ``task.react``)."""
    if not args.config:
        sys.stderr.write("wmproxy: reload --fleet needs -c FILE (the file names the fleet's Redis)\n")
        return 1
    try:
        config = load_config(args.config).config
    except ConfigError as e:
        for line in e.errors:
            sys.stderr.write(f"wmproxy: {line}\n")
        return 1
    if config.fleet is None:
        sys.stderr.write(f"wmproxy: {args.config} has no [fleet] section: reload --fleet needs one\n")
        return 1
    from twisted.internet import defer, task

    from .fleet.reload import fleet_reload

    outcome: list[tuple[list[str], Any]] = []

    def run(reactor: object) -> defer.Deferred[None]:
        d = defer.ensureDeferred(fleet_reload(reactor, config, args.timeout))
        return d.addCallback(outcome.append)

    try:
        task.react(run)
    except SystemExit as e:
        if not outcome:
            sys.stderr.write("wmproxy: reload --fleet failed\n")
            return int(e.code or 1)
    lines, ok = outcome[0]
    if not lines:  # nothing to ask: ok is False and there is a reason
        sys.stderr.write(f"wmproxy: reload --fleet: {ok}\n")
        return 1
    sys.stdout.write("".join(line + "\n" for line in lines))
    if ok is not True:
        sys.stderr.write("wmproxy: reload --fleet: some nodes failed or did not answer\n")
    return 0 if ok is True else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wmproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_check = sub.add_parser("check", help="validate a configuration file and list its listeners")
    p_check.add_argument("-c", "--config", required=True)
    for name, text in (("reload", "re-read the configuration file of a running instance"),
                       ("stop", "stop a running instance gracefully"),
                       ("status", "show listeners, connections, upstream health of a running instance")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-u", "--url", default=None, help=f"control API address (default {DEFAULT_CONTROL})")
        p.add_argument("-t", "--token", default=None, help=f"control_token (or ${TOKEN_ENV})")
        p.add_argument("-c", "--config", default=None, help="take the control address and token from this file")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the raw /status document")
        if name == "reload":
            p.add_argument("--fleet", action="store_true",
                           help="reload every live node of the [fleet] of -c FILE (through its Redis); "
                                "one line per node, exit 1 if any failed or did not answer within --timeout")
    p_gen = sub.add_parser("gen-cert", help="make a local CA and server/client certificates")
    p_gen.add_argument("-o", "--out", default="certs", help="folder to write into (default: certs)")
    p_gen.add_argument("-n", "--name", action="append", default=[],
                       help="a host name or IP the server certificate covers (repeatable; "
                            "localhost, 127.0.0.1 and ::1 are always included)")
    p_gen.add_argument("--client-name", default="wmproxy-client", help="client certificate name")
    p_gen.add_argument("--days", type=int, default=825, help="validity in days")
    p_gen.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)

    if args.cmd == "gen-cert":
        return _gen_cert(args)

    if args.cmd == "check":
        from .tap import run_check

        return run_check(args.config)

    if args.cmd == "reload" and args.fleet:
        return _fleet_reload(args)

    try:
        url, token = _target(args)
    except ConfigError as e:
        for line in e.errors:
            sys.stderr.write(f"wmproxy: {line}\n")
        return 1
    method, path = {"reload": ("POST", "/reload"), "stop": ("POST", "/stop"), "status": ("GET", "/status")}[args.cmd]
    try:
        status, body = _call(url + path, method, token, args.timeout)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        sys.stderr.write(f"wmproxy: no instance answers at {url} ({reason}): is wmproxy running, with its "
                         "`control` at this address? (see -u URL or -c FILE)\n")
        return 1
    if status == 401:
        what = "refused the token" if token else "needs a token"
        sys.stderr.write(f"wmproxy: the control API at {url} {what}: pass -t TOKEN, set ${TOKEN_ENV}, "
                         "or -c FILE with control_token\n")
        return 1
    if status >= 400:
        errors = _errors(body)
        if args.cmd == "reload" and status == 400:
            sys.stderr.write("wmproxy: reload refused; the running configuration stays:\n")
        else:
            sys.stderr.write(f"wmproxy: {args.cmd} failed (HTTP {status}):\n")
        for line in errors:
            sys.stderr.write(f"  {line}\n")
        return 1
    doc = json.loads(body) if body.strip().startswith("{") else {}
    if args.cmd == "status":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else format_status(doc))
    elif args.cmd == "reload":
        sys.stdout.write(f"reloaded {doc.get('config')}: kept {len(doc.get('kept', []))}, opened "
                         f"{', '.join(doc.get('opened', [])) or 'none'}, closed {', '.join(doc.get('closed', [])) or 'none'}\n")
        for w in doc.get("warnings", []):
            sys.stderr.write(f"wmproxy: warning: {w}\n")
    else:
        sys.stdout.write("stopping (open connections drain up to shutdown_timeout)\n")
    return 0


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s % 60}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_status(doc: dict[str, Any]) -> str:
    """The /status document as a few readable lines."""
    cfg = doc.get("config", {})
    lines = [f"pid {doc.get('pid')} ({doc.get('role')}), up {_duration(doc.get('uptime', 0))}, "
             f"config {cfg.get('path')} (sha256 {str(cfg.get('hash', ''))[:12]}), {cfg.get('reloads', 0)} reload(s)"
             + (", STOPPING" if doc.get("stopping") else "")]
    lines.append("listeners:")
    for lst in doc.get("listeners", []):
        lines.append(f"  {lst['name']:<16} {lst['kind']} {lst['bound']:<22} open {lst['open']:<5} "
                     f"accepted {lst['accepted']}")
    ups = doc.get("upstreams", [])
    lines.append("upstreams:" + ("" if ups else " none"))
    for g in ups:
        for m in g.get("members", []):
            lines.append(f"  {g.get('feature')}/{g['name']:<12} {m['addr']:<22} {m['state']:<9} active {m['active']}")
    clients = doc.get("tunnel_clients", [])
    lines.append("tunnel clients:" + ("" if clients else " none"))
    for c in clients:
        lines.append(f"  {c.get('name') or c.get('addr')}")
    fleet = doc.get("fleet")
    if fleet:
        nodes = fleet.get("nodes") or []
        lines.append(f"fleet: node {fleet.get('node_id')}, Redis {fleet.get('redis')} "
                     f"{'available' if fleet.get('available') else 'UNAVAILABLE'}, {len(nodes)} live node(s): "
                     + (", ".join(f"{n.get('node_id')} ({n.get('advertise') or '-'})" for n in nodes) or "none"))
    for w in doc.get("workers", []) or []:
        lines.append(f"worker {w['index']}: pid {w['pid']} {w['state']}, up {_duration(w['uptime'])}, "
                     f"open {w['open']}, accepted {w['accepted']}, restarts {w['restarts']}")
    c = doc.get("counters", {})
    lines.append(f"requests {int(c.get('requests', 0))}, in {_size(c.get('bytes_in', 0))}, "
                 f"out {_size(c.get('bytes_out', 0))}, open connections {doc.get('connections', {}).get('open', 0)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
