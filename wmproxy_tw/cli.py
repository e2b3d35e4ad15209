"""``wmproxy``: talk to a running instance (check, reload, stop, status); make certificates."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from .config import ConfigError, load_config

DEFAULT_CONTROL = "http://127.0.0.1:8837"


def _call(url: str, method: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wmproxy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_check = sub.add_parser("check", help="validate a configuration file")
    p_check.add_argument("-c", "--config", required=True)
    for name in ("reload", "stop", "status"):
        p = sub.add_parser(name, help=f"{name} a running instance")
        p.add_argument("-u", "--url", default=DEFAULT_CONTROL, help="control API address")
        p.add_argument("-t", "--token", default=None, help="control_token, if one is set")
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
        try:
            loaded = load_config(args.config)
        except ConfigError as e:
            for line in e.errors:
                sys.stderr.write(f"wmproxy: {line}\n")
            return 1
        for w in loaded.warnings:
            sys.stderr.write(f"wmproxy: warning: {w}\n")
        sys.stdout.write(f"{args.config}: configuration OK\n")
        return 0

    url = args.url if "://" in args.url else f"http://{args.url}"
    method, path = {"reload": ("POST", "/reload"), "stop": ("POST", "/stop"), "status": ("GET", "/status")}[args.cmd]
    try:
        status, body = _call(url.rstrip("/") + path, method, args.token)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        sys.stderr.write(f"wmproxy: no instance answers at {url}: {reason}\n")
        return 1
    if status >= 400:
        sys.stderr.write(f"wmproxy: {args.cmd} failed ({status}): {body.strip()}\n")
        return 1
    if args.cmd == "status":
        try:
            sys.stdout.write(json.dumps(json.loads(body), indent=2) + "\n")
        except ValueError:
            sys.stdout.write(body)
    else:
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
